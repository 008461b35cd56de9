"""RoPE on q and k at once through the compiled kernel, with a hand-written backward.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition.apply_rope``.

Note [RoPE kernel]
~~~~~~~~~~~~~~~~~~
Turning channel pairs is memory-bound: each output entry costs two multiply-adds, so the time
is what is read and written. Through autograd (the complex multiplication of Note [complex
RoPE] in ``liere.ops``) the gradient of learnable frequencies (MixedRoPE) is a product over the
whole of q and k, written out, then summed over the batch, and the prefix tokens need a
concatenation forward and a slice backward. The kernel (``liere/csrc/rope.c.in``) reads q and
k once forward and q, k and their gradients once backward; it writes the outputs and the
gradients of cos and sin (summed over the batch, over q and k, and over the heads sharing a
table) in the same pass, and copies the prefix rows. With a table gradient it runs one task
per token, every batch row and head, so the sums need no scratch and come out the same on every
run, and each (batch, token) row of q, k and their gradients is read whole, every head side by
side (one task per (table head, token) read one head's 256 bytes at a time and took 1.32 ms
against 0.93 ms at ViT-S/16, batch 8, medians of three alternating runs of 200); without one
(AxialRoPE, the forward) one task per (batch, token), every head, so q, k and the outputs are
swept in memory order. Outputs are laid out like q (Note [output layout] in
``liere.kernels``).

The tables' backward takes each row a vector at a time in its interleaved layout, where the
compiler has lane shuffles and a row is a whole number of vectors: with ``g'`` the gradient
with each pair's two channels swapped, ``dx = g (c, c) + g' (s, -s)``, and per lane
``P += g x``, ``Q += g' x``, so ``dc_j = P_2j + P_2j+1`` and ``ds_j = Q_2j - Q_2j+1``.
Pair by pair, the compiler had de-interleaved the channels element by element. At ViT-S/16,
batch 32, RoPE-Mixed's backward kernel went from 14.0-17.3 to 9.4-9.95 ms (four alternating
processes each, ``results/runs/rope_tables_bench.txt``). Other rows go pair by pair.

Measured at ViT-S/16 (``results/runs/rope_kernel_ab_8d3996a.txt``, the layer forward +
backward against the complex multiplication in the same process): MixedRoPE 1.20 -> 1.16x the
layer without encoding at batch 8 and 1.16 -> 1.06x at batch 32; AxialRoPE within the noise
(1.08 -> 1.04, 1.04 -> 1.06).

It serves tables shared by the batch (positions ``(n, a)``), float32 or float64, on the CPU,
with the kernels built and no tracer running; per-sample tables, other dtypes and devices take
the complex path, and traced graphs the real formulation. Double backward differentiates the
complex path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from liere import kernels as _kernels

from .tracing import is_tracing


def rope_kernel_serves(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, p: int) -> bool:
    """Whether ``rope_kernel`` serves these inputs (Note [RoPE kernel]): tables ``(h | 1, n,
    k)`` (or with a leading 1) shared by the batch, one float dtype, CPU, unit last strides, no
    tracer. ``k`` is ``None`` for one tensor."""
    if is_tracing() or q.dim() != 4 or cos.shape != sin.shape:
        return False
    if k is not None and (k.shape != q.shape or k.stride(-1) != 1):
        return False
    if cos.dim() == 4:
        if cos.shape[0] != 1:
            return False
        cos = cos[0]
    if cos.dim() != 3:
        return False
    b, h, t, d = q.shape
    hr, n, pairs = cos.shape
    return (
        q.numel() > 0
        and 2 * pairs == d
        and t - p == n
        and hr >= 1
        and h % hr == 0
        and q.stride(-1) == 1
        and _kernels.usable(q, *(() if k is None else (k,)), cos, sin, size=2, sizes=(2,))
    )


Reference = Callable[..., tuple[Tensor, ...]]


def rope_kernel(
    q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, p: int, reference: Reference
) -> tuple[Tensor, ...]:
    """RoPE on q and k (or on q alone, ``k=None``) through the kernel, the first ``p`` tokens
    unrotated (``rope_kernel_serves`` must hold). ``reference(q, k, cos, sin, p)`` is the
    autograd formulation (same outputs) that double backward differentiates.

    Shape:
        q, k ``(b, h, p + n, 2k)``; cos, sin ``(h | 1, n, k)`` or ``(1, h | 1, n, k)``
        -> ``(q', k')`` or ``(q',)``, each ``(b, h, p + n, 2k)``
    """
    out: tuple[Tensor, ...] = _Rope.apply(q, k, cos, sin, p, reference)
    return out


class _Rope(torch.autograd.Function):
    """Note [RoPE kernel]."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Optional[Tensor],
        cos: Tensor,
        sin: Tensor,
        p: int,
        reference: Reference,
    ) -> tuple[Tensor, ...]:
        ctx.p, ctx.reference, ctx.table_shape = p, reference, cos.shape
        c, s = (t.reshape(t.shape[-3:]).contiguous() for t in (cos, sin))
        # q and k for the tables' gradient and double backward (views of tensors autograd
        # keeps anyway: attention saves v, a view of the same qkv)
        ctx.save_for_backward(q, k, c, s, cos, sin)
        out_q, out_k = _kernels.rope_forward(q, k, c, s, p)
        return (out_q,) if out_k is None else (out_q, out_k)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, c, s, cos, sin = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            # create_graph=True (double backward): differentiate the reference formulation
            inputs = [t for t, n in zip((q, k, cos, sin), need) if n]
            with torch.enable_grad():
                outs = ctx.reference(q, k, cos, sin, ctx.p)
                got = iter(torch.autograd.grad(outs, inputs, grads, create_graph=True))
            return (*(next(got) if n else None for n in need), None, None)
        grad_q, grad_k = _unit_last(grads)
        d_q, d_k, d_cos, d_sin = _kernels.rope_backward(
            q, k, c, s, grad_q, grad_k, ctx.p, need[0] or need[1], need[2] or need[3]
        )
        if d_cos is not None and d_sin is not None:
            d_cos, d_sin = d_cos.view(ctx.table_shape), d_sin.view(ctx.table_shape)
        return d_q, d_k, d_cos, d_sin, None, None


def _unit_last(grads: tuple[Tensor, ...]) -> tuple[Tensor, Optional[Tensor]]:
    """The output gradients with unit last strides (the kernel reads rows), ``None`` for k's
    when there is no k."""
    fixed = [g if g.stride(-1) == 1 else g.contiguous() for g in grads]
    return fixed[0], fixed[1] if len(fixed) > 1 else None

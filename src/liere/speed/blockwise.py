"""Blockwise application of the rotations to q and k.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from liere import kernels as _kernels

from .rotations import FEW_TOKENS
from .tracing import is_tracing


def apply_blockwise(x: Tensor, rotations: Tensor) -> Tensor:
    """``x'[.., m*s:(m+1)*s] = R[.., m] @ x[.., m*s:(m+1)*s]`` for every block ``m``.

    The batch is the GEMM's column dimension: rotations are never copied over the batch.
    A heads dim of 1 in ``rotations`` is shared by every head of ``x``.

    Shape:
        x ``(b, h, n, d)``; rotations ``(h | 1, n, m, s, s)`` (shared by the batch) or
        ``(b, h | 1, n, m, s, s)`` (per sample), with ``m * s == d`` -> ``(b, h, n, d)``
    """
    m, s = rotations.shape[-3], rotations.shape[-1]
    if rotations.dim() == 5 and rotations.shape[1] <= FEW_TOKENS:
        if x.shape[1] % rotations.shape[0] == 0:
            return _apply_few(x, rotations)
    xb = x.unflatten(-1, (m, s))
    if rotations.dim() == 5:
        if rotations.shape[0] == 1:
            out = torch.einsum("nmij,bhnmj->bhnmi", rotations[0], xb)
        else:
            out = torch.einsum("hnmij,bhnmj->bhnmi", rotations, xb)
    elif rotations.shape[1] == 1:
        out = torch.einsum("bnmij,bhnmj->bhnmi", rotations[:, 0], xb)
    else:
        out = torch.einsum("bhnmij,bhnmj->bhnmi", rotations, xb)
    return out.flatten(-2)


def apply_blockwise_vjp(grad: Tensor, x: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
    """``apply_blockwise``'s vector-Jacobian product, first order, no autograd:
    ``dx = R^T g`` per block and ``dR = g x^T`` summed over the batch (and over the heads
    that share a rotation).

    Shape:
        grad, x ``(b, h, n, d)``; rotations ``(h', n, m, s, s)`` or ``(b, h', n, m, s, s)``
        with ``h % h' == 0`` -> as x and rotations
    """
    m, s = rotations.shape[-3], rotations.shape[-1]
    per_sample = rotations.dim() == 6
    hr = rotations.shape[1] if per_sample else rotations.shape[0]
    b, h, n = x.shape[:3]
    xb = x.reshape(b, hr, h // hr, n, m, s)
    gb = grad.reshape(b, hr, h // hr, n, m, s)
    r = "zrnmij" if per_sample else "rnmij"
    d_x = torch.einsum(f"{r},zrcnmi->zrcnmj", rotations, gb).reshape(x.shape)
    d_rot = torch.einsum(f"zrcnmi,zrcnmj->{r}", gb, xb)
    return d_x, d_rot


def apply_blockwise_pair(
    q: Tensor, k: Tensor, rotations: Tensor, *, num_prefix_tokens: int = 0
) -> tuple[Tensor, Tensor]:
    """``apply_blockwise`` to q and k at once; the first ``num_prefix_tokens`` tokens (class or
    register tokens) pass through unrotated and ``rotations`` cover the rest.

    With rotations shared by the batch (the common case) this is one batched product
    ``(2b, s) @ (s, s)`` per (head, token, block), q and k side by side (``(2bh, s)`` when one
    rotation serves every head), with a hand-written backward (Note [blockwise application]).

    Shape:
        q, k ``(b, h, p + n, d)`` (same shape and dtype); rotations ``(h | 1, n, m, s, s)`` or
        ``(b, h | 1, n, m, s, s)`` -> ``(b, h, p + n, d)`` each
    """
    p = num_prefix_tokens
    fast = rotations.dim() == 5 and q.shape == k.shape and q.dtype == k.dtype == rotations.dtype
    if fast and p == 0 and rotations.shape[1] <= FEW_TOKENS:
        # Note [few tokens]: one product over q and k side by side beats the gather/scatter
        b = q.shape[0]
        both = apply_blockwise(torch.cat((q, k)), rotations)
        return both[:b], both[b:]
    if not is_tracing() and pair_function_serves(q, k, rotations, p):
        out: tuple[Tensor, Tensor] = _BlockwisePair.apply(q, k, rotations, p)
        return out
    return blockwise_pair_plain(q, k, rotations, p)


def pair_function_serves(q: Tensor, k: Tensor, rotations: Tensor, p: int) -> bool:
    """Whether ``apply_blockwise_pair`` runs ``_BlockwisePair`` (Note [blockwise application])
    for these inputs, so that ``blockwise_pair_backward`` is its gradient."""
    return (
        rotations.dim() == 5
        and all(_kernels.has_storage(t) for t in (q, k, rotations))  # not torch.func's wrappers
        and q.shape == k.shape
        and q.dtype == k.dtype == rotations.dtype
        and not (p == 0 and rotations.shape[1] <= FEW_TOKENS)
        and q.shape[1] % rotations.shape[0] == 0
        and q.shape[2] - p == rotations.shape[1]
    )


def _apply_few(x: Tensor, rotations: Tensor) -> Tensor:
    """``apply_blockwise`` for few tokens (Note [few tokens]): the batch, and the heads that
    share a rotation, become the columns of one batched product.

    Shape:
        x ``(b, h, n, d)``; rotations ``(h', n, m, s, s)`` with ``h % h' == 0`` -> ``(b, h, n, d)``
    """
    hr, n, m, s = rotations.shape[0], rotations.shape[1], rotations.shape[2], rotations.shape[-1]
    b, h = x.shape[0], x.shape[1]
    columns = x.view(b, hr, h // hr, n, m, s).permute(1, 3, 4, 5, 0, 2)  # h' n m s b h/h'
    out = torch.matmul(rotations, columns.reshape(hr, n, m, s, -1))
    out = out.view(hr, n, m, s, b, h // hr).permute(4, 0, 5, 1, 2, 3)
    return out.reshape(b, h, n, m * s)


def blockwise_pair_plain(q: Tensor, k: Tensor, rotations: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Slice off the prefix, rotate each of q and k with autograd ops, concatenate."""
    q_rot, k_rot = apply_blockwise(q[:, :, p:], rotations), apply_blockwise(k[:, :, p:], rotations)
    if p == 0:
        return q_rot, k_rot
    return torch.cat((q[:, :, :p], q_rot), dim=2), torch.cat((k[:, :, :p], k_rot), dim=2)


# Note [blockwise application]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# bmm needs one uniform batch stride, which (head, token, block) slices of q and k never have,
# so the rotated part of q and k is gathered once into X of shape (P, C, s), P = (head, token,
# block) and C = (q|k, batch, heads sharing the rotation), and multiplied by R^T:
#   forward   Y = X @ R^T                 (P, C, s) @ (P, s, s)
#   backward  dX = dY @ R,  dR^T = X^T @ dY
# Outputs and input gradients are written straight into fresh (b, h, p + n, d) tensors,
# prefix tokens copied alongside, so no cat, slice-backward zero fill or select-backward
# zero fill is left for autograd. Every bmm operand is a contiguous matrix or the transpose
# of one: anything else makes ATen fall back to a per-matrix loop, ~50x slower here.


def _gather_blocks(x: Tensor, out: Tensor, p: int) -> None:
    """Copy ``x[:, :, p:]`` ``(b, h, n, m*s)`` into ``out`` ``(h', n, m, b, h/h', s)``."""
    hr, n, m, b, hc, s = out.shape
    src = x[:, :, p:].unflatten(1, (hr, hc)).unflatten(-1, (m, s))  # b h' hc n m s
    out.copy_(src.permute(1, 3, 4, 0, 2, 5))


def _scatter_blocks(blocks: Tensor, prefix_src: Tensor, p: int) -> Tensor:
    """A fresh ``(b, h, p + n, d)`` tensor: prefix tokens from ``prefix_src``, the rest from
    ``blocks`` ``(h', n, m, b, h/h', s)``."""
    hr, n, m, b, hc, s = blocks.shape
    out = blocks.new_empty(b, hr * hc, p + n, m * s)
    if p:
        out[:, :, :p].copy_(prefix_src[:, :, :p])
    dst = out[:, :, p:].unflatten(1, (hr, hc)).unflatten(-1, (m, s))
    dst.copy_(blocks.permute(3, 0, 4, 1, 2, 5))
    return out


class _BlockwisePair(torch.autograd.Function):
    """Note [blockwise application]."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, rotations: Tensor, p: int) -> tuple[Tensor, Tensor]:
        b, h, _, d = q.shape
        hr, n, m, s, _ = rotations.shape
        ctx.p = p
        ctx.kernel = _kernels.usable(q, k, rotations, size=s, sizes=_kernels.APPLY_SIZES)
        if ctx.kernel:  # Note [compiled kernels]: q and k read in place, no gather
            rotations = rotations.contiguous()
            ctx.save_for_backward(None, rotations, q, k)
            return _kernels.apply_forward(q, k, rotations, p)
        hc = h // hr
        x = q.new_empty(hr, n, m, 2, b, hc, s)
        _gather_blocks(q, x[:, :, :, 0], p)
        _gather_blocks(k, x[:, :, :, 1], p)
        rot = rotations.reshape(-1, s, s)
        y = torch.bmm(x.view(rot.shape[0], -1, s), rot.mT.contiguous()).view(x.shape)
        # x only if the rotations need a gradient; q and k for double backward only (views of
        # tensors autograd keeps anyway)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, rotations, q, k)
        return _scatter_blocks(y[:, :, :, 0], q, p), _scatter_blocks(y[:, :, :, 1], k, p)

    @staticmethod
    def backward(
        ctx: Any, grad_q: Tensor, grad_k: Tensor
    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        x, rotations, q, k = ctx.saved_tensors
        p = ctx.p
        if torch.is_grad_enabled():
            # create_graph=True (double backward): recompute differentiably
            inputs = [t for t in (q, k, rotations) if t.requires_grad]
            with torch.enable_grad():
                outs = blockwise_pair_plain(q, k, rotations, p)
                grads = iter(torch.autograd.grad(outs, inputs, (grad_q, grad_k), create_graph=True))
            d_q, d_k, d_r = (next(grads) if t.requires_grad else None for t in (q, k, rotations))
            return d_q, d_k, d_r, None
        need_qk = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        d_q, d_k, d_r = blockwise_pair_backward(
            grad_q, grad_k, q, k, rotations, p, need_qk, ctx.needs_input_grad[2], x, ctx.kernel
        )
        return d_q, d_k, d_r, None


def blockwise_pair_backward(
    grad_q: Tensor,
    grad_k: Tensor,
    q: Tensor,
    k: Tensor,
    rotations: Tensor,
    p: int,
    need_qk: bool = True,
    need_rotations: bool = True,
    gathered: Optional[Tensor] = None,
    kernel: Optional[bool] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``apply_blockwise_pair``'s vector-Jacobian product with rotations shared by the batch
    (Note [blockwise application]), first order, no autograd: ``_BlockwisePair``'s backward,
    and the registered backward operator's. ``gathered``: the forward's gathered q and k, if
    kept (gathered again otherwise); ``kernel``: whether the compiled kernel serves (checked
    when ``None``).

    Shape:
        grad_q, grad_k, q, k ``(b, h, p + n, d)``; rotations ``(h | 1, n, m, s, s)``
        -> as q, k and rotations (``None`` where not needed)
    """
    hr, n, m, s, _ = rotations.shape
    if kernel is None:
        kernel = _kernels.usable(q, k, rotations, size=s, sizes=_kernels.APPLY_SIZES)
    if kernel:
        return _kernels.apply_backward(
            q, k, rotations.contiguous(), grad_q, grad_k, p, need_qk, need_rotations
        )
    shape = torch.Size((hr, n, m, 2, grad_q.shape[0], grad_q.shape[1] // hr, s))
    g = grad_q.new_empty(shape)
    _gather_blocks(grad_q, g[:, :, :, 0], p)
    _gather_blocks(grad_k, g[:, :, :, 1], p)
    count = shape[0] * shape[1] * shape[2]
    g_flat = g.view(count, -1, s)
    d_rot = None
    if need_rotations:
        x = gathered
        if x is None:
            x = q.new_empty(shape)
            _gather_blocks(q, x[:, :, :, 0], p)
            _gather_blocks(k, x[:, :, :, 1], p)
        d_rot = torch.bmm(x.view(count, -1, s).mT, g_flat).mT.reshape(shape[:3] + (s, s))
    d_q = d_k = None
    if need_qk:
        d_x = torch.bmm(g_flat, rotations.reshape(count, s, s).contiguous()).view(shape)
        d_q = _scatter_blocks(d_x[:, :, :, 0], grad_q, p)
        d_k = _scatter_blocks(d_x[:, :, :, 1], grad_k, p)
    return d_q, d_k, d_rot

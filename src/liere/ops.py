"""liere's registered operators: the speed layer's entry points as ``torch.library`` ops.

Note [registered operators]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Inside ``torch.compile`` or ``torch.export`` the fast exponential cannot run as Python: its
squaring counts, ray plans and compiled kernels depend on values, so a traced graph used to
fall back to ``torch.linalg.matrix_exp`` (3.8x slower compiled than eager). Registered ops are
opaque to the tracer: the graph holds ``liere::lie_rotations`` and friends, shapes come from
their fake implementations, and at run time their real implementations run the eager fast
path, where values, kernels and the matmul-precision flags (Note [matmul precision]) can be
read.

========================================  ===========================================
op                                        computes
========================================  ===========================================
``liere::lie_rotations``                  ``exp(sum_a p_a B_a)`` per token and block
``liere::lie_rotations_keeping_series``   the same, and what its backward would recompute
``liere::lie_rotations_backward``         their vector-Jacobian product
``liere::apply_blockwise``                ``R @ x`` per token and block
``liere::apply_blockwise_backward``       its vector-Jacobian product
``liere::apply_blockwise_pair``           both of q and k, prefix tokens left unrotated
``liere::apply_blockwise_pair_backward``  its vector-Jacobian product
========================================  ===========================================

The backward ops compute their vector-Jacobian products without a recompute where the fast
path's hand-written backwards cover the case: ``liere::apply_blockwise_pair_backward`` runs
``blockwise_pair_backward`` (the compiled kernel or two batched products), and
``liere::lie_rotations_backward`` runs ``bases_vjp`` when only the bases need a gradient and
the CPU fast path ran on its kernels (shared positions; one or two axes, or three with blocks
up to 8x8): it takes the forward's output, recomputes the series and runs the kernels'
backwards and the series', never the squarings or products forward. Measured at ViT-S/16,
batch 8: the rotations' backward operator went from 18 ms (always a recompute) to 7 ms
(``benchmarks/bench_ops.py``, ``docs/performance.md``). A traced training graph with shared
CPU positions of one or two axes holds ``liere::lie_rotations_keeping_series`` instead: it
also returns the spectral norms, monomials, coefficients and series (sizes from the input
shapes alone), and the backward operator reads them (its ``kept`` argument) instead of
recomputing them (Note [series kept for the backward operator] in
``liere.speed.rotations``): 4.8 -> 3.1 ms for that operator at ViT-S/16, batch 8.

Elsewhere they differentiate a recompute. An op's implementation runs below the autograd
dispatch key, where ``torch.autograd`` records nothing. ``torch.func.vjp`` does its own
bookkeeping and works there, on the caller's thread and stream, through plain ops: the
blockwise applications and, off the CPU, the device-generic exponential (Note [sync-free
rotations]). The CPU fast path's autograd Functions hand pointers to the kernels, which
``torch.func``'s wrapped tensors do not have, so its remaining cases (position gradients,
few tokens, per-sample positions, re-orthogonalised blocks, the kernels off) recompute under
autograd on a worker thread (``_with_autograd``; one per process, started on first use;
autocast and inference mode are thread-local and off there, as the ops want; the caller
waits). The backward ops have no autograd formula of their own: double backward runs in
eager mode (the eager path is untouched and keeps it); ``torch.compile`` does not support
double backward anyway.

Every implementation turns autocast off itself (``_without_autocast``): a compiled graph
calls it in the caller's autocast state, under which the exponential's products would run in
bf16 (1.7e-2 off at ViT-S/16 shapes; the test checks the same bits with and without).

The dispatch functions (``block_rotations``, ``blockwise``, ``blockwise_pair``) pick the op
while tracing and the eager path otherwise, both at full precision.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import functional as F
from .kernels import row_strides
from .precision import exact_dtype, no_autocast
from .speed.blockwise import apply_blockwise_vjp, blockwise_pair_backward, pair_function_serves
from .speed.rope import rope_kernel, rope_kernel_serves
from .speed.rotations import (
    KeptSeries,
    bases_vjp,
    keeps_series,
    kept_nothing,
    kept_series_shapes,
    rotations_keeping_series,
)

__all__ = ["block_rotations", "blockwise", "blockwise_pair", "rope", "rope_pair"]


def _rotation_shape(positions: Tensor, bases: Tensor) -> tuple[int, ...]:
    h, _, m, s, _ = bases.shape
    lead = positions.shape[:-2]
    return (*lead, h, positions.shape[-2], m, s, s)


def _full_precision(fn: Callable[..., Tensor], *tensors: Tensor, **kwargs: object) -> Tensor:
    """``fn(*tensors)`` with matrix products at full float32 precision (Note [matmul
    precision]): in float64 when float32 matmuls are reduced on this device."""
    work = exact_dtype(tensors[0].dtype, tensors[0].device)
    if work == tensors[0].dtype:
        return fn(*tensors, **kwargs)
    out = fn(*(t.to(work) for t in tensors), **kwargs)
    return out.to(tensors[0].dtype)


_WORKER: Optional[tuple[int, ThreadPoolExecutor]] = None
_WORKER_LOCK = threading.Lock()


def _with_autograd(fn: Callable[[], Any]) -> Any:
    """``fn()`` on liere's autograd worker thread, where autograd records (see the module's
    Note). One worker per process, started on first use (and again in a forked child): a
    fresh thread per call costs more than the recompute at small sizes, as each new thread
    starts its own OpenMP team."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None or _WORKER[0] != os.getpid():
            _WORKER = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="liere-autograd"))
        worker = _WORKER[1]

    def run() -> Any:
        with torch.enable_grad():
            return fn()

    if threading.current_thread().name.startswith("liere-autograd"):
        # already on the worker (a liere op inside a recompute): a second thread, not a wait
        # on ourselves
        done: list[Any] = []
        helper = threading.Thread(target=lambda: done.append(_capture(run)))
        helper.start()
        helper.join()
        return _unwrap(done[0])
    return worker.submit(run).result()  # re-raises fn's exception here


def _capture(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except BaseException as err:  # re-raised by _unwrap on the caller's thread
        return False, err


def _unwrap(outcome: tuple[bool, Any]) -> Any:
    ok, value = outcome
    if not ok:
        raise value
    return value


def _vjp(fn: Callable[..., Any], inputs: tuple[Tensor, ...], *grads: Tensor) -> tuple[Tensor, ...]:
    """The vector-Jacobian product of ``fn`` at ``inputs`` by ``torch.func.vjp``, on the
    caller's thread and stream, autocast off. ``torch.func`` records where ``torch.autograd``
    cannot (an op's implementation), but only through plain ops: not through the fast
    path's autograd Functions, whose kernels read pointers (see the module's Note)."""
    with no_autocast(inputs[0].device.type):
        pull = torch.func.vjp(fn, *(t.detach() for t in inputs))[1]
        return tuple(pull(grads[0] if len(grads) == 1 else grads))


def _without_autocast(impl: Callable[..., Any]) -> Callable[..., Any]:
    """An operator's implementation with autocast off: it runs under the caller's autocast
    (a compiled graph calls it in whatever autocast state the caller is in), and rotations are
    computed in their own dtype (Note [matmul precision])."""

    @functools.wraps(impl)
    def run(*args: Any) -> Any:
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with no_autocast(device):
            return impl(*args)

    return run


# -- the exponential -----------------------------------------------------------------------


@torch.library.custom_op("liere::lie_rotations", mutates_args=())
@_without_autocast
def _lie_rotations(
    positions: Tensor, bases: Tensor, reorthogonalize_above: Optional[float], check_finite: bool
) -> Tensor:
    """``R[.., h, n, m] = exp(sum_a p[.., n, a] B[h, a, m])``: ``F.lie_rotations``' fast path
    (off the CPU with ``check_finite=False``: no host read, Note [sync-free rotations]).

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)`` (same dtype)
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    with torch.no_grad():
        return _full_precision(
            F.lie_rotations,
            positions,
            bases,
            reorthogonalize_above=reorthogonalize_above,
            check_finite=check_finite,
        ).contiguous()


@_lie_rotations.register_fake
def _(
    positions: Tensor, bases: Tensor, reorthogonalize_above: Optional[float], check_finite: bool
) -> Tensor:
    _check_rotation_inputs(positions, bases)
    return bases.new_empty(_rotation_shape(positions, bases))


def _check_rotation_inputs(positions: Tensor, bases: Tensor) -> None:
    if positions.dim() not in (2, 3) or bases.dim() != 5:
        raise ValueError(
            f"liere::lie_rotations takes positions (n, a) or (b, n, a) and bases "
            f"(h, a, m, s, s); got {tuple(positions.shape)} and {tuple(bases.shape)}."
        )
    if positions.shape[-1] != bases.shape[1] or positions.dtype != bases.dtype:
        raise ValueError(
            f"liere::lie_rotations: positions {tuple(positions.shape)} {positions.dtype} must "
            f"match the bases' axes and dtype ({bases.shape[1]} axes, {bases.dtype})."
        )


@torch.library.custom_op("liere::lie_rotations_backward", mutates_args=())
@_without_autocast
def _lie_rotations_backward(
    grad: Tensor,
    positions: Tensor,
    bases: Tensor,
    rotations: Tensor,
    reorthogonalize_above: Optional[float],
    check_finite: bool,
    positions_grad: bool,
    kept: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """Gradients of ``liere::lie_rotations`` with respect to positions (zeros unless
    ``positions_grad``) and bases; ``rotations`` is the forward's output, ``kept`` the rest of
    ``liere::lie_rotations_keeping_series``' outputs when that op ran the forward. Without
    position gradients the fast path's common case runs its hand-written backwards directly
    (``bases_vjp``); anything else recomputes the forward under autograd."""
    if not positions_grad:
        work = exact_dtype(bases.dtype, bases.device)
        saved = KeptSeries(*kept) if kept and work == bases.dtype else None
        direct = bases_vjp(
            grad.to(work), positions.to(work), bases.to(work), rotations.to(work),
            reorthogonalize_above, saved,
        )  # fmt: skip
        if direct is not None:
            return positions.new_zeros(positions.shape), direct.to(bases.dtype)

    def rotations_of(p: Tensor, b: Tensor) -> Tensor:
        return _full_precision(
            F.lie_rotations,
            p,
            b,
            reorthogonalize_above=reorthogonalize_above,
            check_finite=check_finite,
        )

    if positions.device.type != "cpu":  # the device-generic path: plain ops, torch.func
        if positions_grad:
            grad_p, grad_b = _vjp(rotations_of, (positions, bases), grad)
        else:
            (grad_b,) = _vjp(lambda b: rotations_of(positions, b), (bases,), grad)
            grad_p = positions.new_zeros(positions.shape)
        return grad_p.contiguous(), grad_b.contiguous()

    def vjp() -> tuple[Optional[Tensor], ...]:  # the CPU fast path's other cases
        p = positions.detach().requires_grad_(positions_grad)
        b = bases.detach().requires_grad_(True)
        inputs = (p, b) if positions_grad else (b,)
        return torch.autograd.grad(rotations_of(p, b), inputs, grad, allow_unused=True)

    grads = _with_autograd(vjp)
    grad_b = grads[-1] if grads[-1] is not None else bases.new_zeros(bases.shape)
    grad_p = (
        grads[0]
        if positions_grad and grads[0] is not None
        else positions.new_zeros(positions.shape)
    )
    return grad_p.contiguous(), grad_b.contiguous()


@_lie_rotations_backward.register_fake
def _(
    grad: Tensor,
    positions: Tensor,
    bases: Tensor,
    rotations: Tensor,
    reorthogonalize_above: Optional[float],
    check_finite: bool,
    positions_grad: bool,
    kept: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    return positions.new_empty(positions.shape), bases.new_empty(bases.shape)


def _rotations_setup(ctx: Any, inputs: tuple[object, ...], output: Any) -> None:
    """Both forward ops': ``liere::lie_rotations``' rotations, or
    ``liere::lie_rotations_keeping_series``' rotations and what they keep (no gradient)."""
    positions, bases, reorthogonalize_above, check_finite = inputs
    outputs = tuple(output) if isinstance(output, (tuple, list)) else (output,)
    ctx.save_for_backward(positions, bases, *outputs)
    if len(outputs) > 1:
        # the kept tensors take no gradient: without this autograd would fill a zero gradient
        # for each (2.4 MB for the series at ViT-S/16, 1.2 ms a call here)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)
    ctx.reorthogonalize_above = reorthogonalize_above
    ctx.check_finite = check_finite


def _rotations_backward(ctx: Any, grad: Tensor, *_kept_grads: Any) -> tuple[Optional[Tensor], ...]:
    if grad is None:  # only where grads are not materialised: nothing flowed back
        return (None, None, None, None)
    positions, bases, rotations, *kept = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_p, grad_b = _lie_rotations_backward(
        grad.contiguous(),
        positions,
        bases,
        rotations,
        ctx.reorthogonalize_above,
        ctx.check_finite,
        bool(needs[0]),
        kept,
    )
    return (grad_p if needs[0] else None, grad_b if needs[1] else None, None, None)


_lie_rotations.register_autograd(_rotations_backward, setup_context=_rotations_setup)


@torch.library.custom_op("liere::lie_rotations_keeping_series", mutates_args=())
@_without_autocast
def _lie_rotations_keeping_series(
    positions: Tensor, bases: Tensor, reorthogonalize_above: Optional[float], check_finite: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``liere::lie_rotations`` for training: the rotations, then what the backward operator
    would otherwise recompute (Note [series kept for the backward operator] in
    ``liere.speed.rotations``): the bases' spectral norms ``(h, a, m)`` (NaN where nothing was
    kept), the monomials ``(n, T)``, the coefficients ``(h*m, s, T*s)`` and the series
    ``(n*h*m*s*s,)``. For shared CPU positions of one or two axes (``keeps_series``).

    Shape:
        positions ``(n, a)``; bases ``(h, a, m, s, s)`` -> ``(h, n, m, s, s)`` and the above
    """
    _check_keeping_series(positions, bases)
    if exact_dtype(bases.dtype, bases.device) != bases.dtype:  # reduced matmuls: float64
        rot = _lie_rotations(positions, bases, reorthogonalize_above, check_finite)
        return rot, *kept_nothing(positions.shape, bases)
    rot, kept = rotations_keeping_series(positions, bases, reorthogonalize_above)
    return rot.contiguous(), *kept


@_lie_rotations_keeping_series.register_fake
def _(
    positions: Tensor, bases: Tensor, reorthogonalize_above: Optional[float], check_finite: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_keeping_series(positions, bases)
    shapes = kept_series_shapes(positions.shape, bases.shape, bases.dtype)
    rot = bases.new_empty(_rotation_shape(positions, bases))
    return rot, *(bases.new_empty(shape) for shape in shapes)  # type: ignore[return-value]


def _check_keeping_series(positions: Tensor, bases: Tensor) -> None:
    _check_rotation_inputs(positions, bases)
    if not keeps_series(positions, bases):
        raise ValueError(
            "liere::lie_rotations_keeping_series serves shared CPU positions (n, a) with one "
            "or two axes, more than 8 tokens and blocks the compiled kernels take (4 to 64); "
            f"got positions {tuple(positions.shape)} on "
            f"{positions.device} and bases {tuple(bases.shape)} {bases.dtype}. Use "
            "liere::lie_rotations."
        )


_lie_rotations_keeping_series.register_autograd(_rotations_backward, setup_context=_rotations_setup)


# -- blockwise application -----------------------------------------------------------------


@torch.library.custom_op("liere::apply_blockwise", mutates_args=())
@_without_autocast
def _apply_blockwise(x: Tensor, rotations: Tensor) -> Tensor:
    """``F.apply_blockwise``: ``R @ x`` per token and block.

    Shape:
        x ``(b, h, n, d)``; rotations ``(h | 1, n, m, s, s)`` or ``(b, h | 1, n, m, s, s)``
        -> ``(b, h, n, d)``
    """
    with torch.no_grad():
        return _full_precision(F.apply_blockwise, x, rotations).contiguous()


@_apply_blockwise.register_fake
def _(x: Tensor, rotations: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("liere::apply_blockwise_backward", mutates_args=())
@_without_autocast
def _apply_blockwise_backward(grad: Tensor, x: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``liere::apply_blockwise`` with respect to x and the rotations."""

    work = exact_dtype(x.dtype, x.device)
    grad_x, grad_r = apply_blockwise_vjp(grad.to(work), x.to(work), rotations.to(work))
    return grad_x.to(x.dtype).contiguous(), grad_r.to(rotations.dtype).contiguous()


@_apply_blockwise_backward.register_fake
def _(grad: Tensor, x: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), rotations.new_empty(rotations.shape)


def _apply_setup(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _apply_backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    x, rotations = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_r = _apply_blockwise_backward(grad.contiguous(), x, rotations)
    return (grad_x if needs[0] else None, grad_r if needs[1] else None)


_apply_blockwise.register_autograd(_apply_backward, setup_context=_apply_setup)


@torch.library.custom_op("liere::apply_blockwise_pair", mutates_args=())
@_without_autocast
def _apply_blockwise_pair(
    q: Tensor, k: Tensor, rotations: Tensor, num_prefix_tokens: int
) -> tuple[Tensor, Tensor]:
    """``F.apply_blockwise_pair``: q and k rotated at once, the first ``num_prefix_tokens``
    tokens unrotated.

    Shape:
        q, k ``(b, h, p + n, d)``; rotations ``(h | 1, n, m, s, s)`` or
        ``(b, h | 1, n, m, s, s)`` -> ``(b, h, p + n, d)`` each
    """
    with torch.no_grad():
        q_out, k_out = _pair_full_precision(q, k, rotations, num_prefix_tokens)
        return _laid_out_like(q_out, q), _laid_out_like(k_out, k)


def _laid_out_like(out: Tensor, like: Tensor) -> Tensor:
    """``out`` with ``row_strides(like)``, the layout the fake implementation promises and
    the kernels write (Note [output layout] in ``liere.kernels``): a copy only when a path
    left it otherwise."""
    strides = row_strides(like)
    if out.stride() == strides:
        return out
    return torch.empty_strided(out.shape, strides, dtype=out.dtype, device=out.device).copy_(out)


def _pair_full_precision(
    q: Tensor, k: Tensor, rotations: Tensor, num_prefix_tokens: int
) -> tuple[Tensor, Tensor]:
    """``F.apply_blockwise_pair`` with its products at full float32 precision (Note [matmul
    precision]), in q's and k's dtypes."""
    work = exact_dtype(q.dtype, q.device)
    if work == q.dtype:
        return F.apply_blockwise_pair(q, k, rotations, num_prefix_tokens=num_prefix_tokens)
    q_out, k_out = F.apply_blockwise_pair(
        q.to(work), k.to(work), rotations.to(work), num_prefix_tokens=num_prefix_tokens
    )
    return q_out.to(q.dtype), k_out.to(k.dtype)


@_apply_blockwise_pair.register_fake
def _(q: Tensor, k: Tensor, rotations: Tensor, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    return (
        q.new_empty_strided(q.shape, row_strides(q)),
        k.new_empty_strided(k.shape, row_strides(k)),
    )


@torch.library.custom_op("liere::apply_blockwise_pair_backward", mutates_args=())
@_without_autocast
def _apply_blockwise_pair_backward(
    grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, rotations: Tensor, num_prefix_tokens: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``liere::apply_blockwise_pair`` with respect to q, k and the rotations:
    ``blockwise_pair_backward`` directly where ``_BlockwisePair`` serves the forward (Note
    [blockwise application]), else by differentiating a recompute."""
    work = exact_dtype(q.dtype, q.device)
    if pair_function_serves(q, k, rotations, num_prefix_tokens):
        gq, gk, gr = blockwise_pair_backward(
            grad_q.to(work), grad_k.to(work), q.to(work), k.to(work), rotations.to(work),
            num_prefix_tokens,
        )  # fmt: skip
        assert gq is not None and gk is not None and gr is not None
        return (
            _laid_out_like(gq.to(q.dtype), grad_q),
            _laid_out_like(gk.to(k.dtype), grad_k),
            gr.to(rotations.dtype).contiguous(),
        )

    p, rot = num_prefix_tokens, rotations.to(work)
    grads = []
    d_rots = []
    for g, t in ((grad_q, q), (grad_k, k)):  # each rotated on its own (apply_blockwise)
        d_t, d_r = apply_blockwise_vjp(g[:, :, p:].to(work), t[:, :, p:].to(work), rot)
        grads.append(torch.cat((g[:, :, :p].to(work), d_t), dim=2) if p else d_t)
        d_rots.append(d_r)
    grads.append(d_rots[0] + d_rots[1])
    return (
        _laid_out_like(grads[0].to(q.dtype), grad_q),
        _laid_out_like(grads[1].to(k.dtype), grad_k),
        grads[2].to(rotations.dtype).contiguous(),
    )


@_apply_blockwise_pair_backward.register_fake
def _(
    grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, rotations: Tensor, num_prefix_tokens: int
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        q.new_empty_strided(q.shape, row_strides(grad_q)),
        k.new_empty_strided(k.shape, row_strides(grad_k)),
        rotations.new_empty(rotations.shape),
    )


def _pair_setup(ctx: Any, inputs: tuple[object, ...], output: object) -> None:
    q, k, rotations, num_prefix_tokens = inputs
    ctx.save_for_backward(q, k, rotations)
    ctx.num_prefix_tokens = num_prefix_tokens


def _pair_backward(
    ctx: Any, grad_q: Tensor, grad_k: Tensor
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
    q, k, rotations = ctx.saved_tensors
    needs = ctx.needs_input_grad
    gq, gk, gr = _apply_blockwise_pair_backward(
        grad_q,  # as they come: the gradients of q and k are laid out like them (row_strides)
        grad_k,
        q,
        k,
        rotations,
        ctx.num_prefix_tokens,
    )
    return (gq if needs[0] else None, gk if needs[1] else None, gr if needs[2] else None, None)


_apply_blockwise_pair.register_autograd(_pair_backward, setup_context=_pair_setup)


# -- dispatch ------------------------------------------------------------------------------


def block_rotations(
    positions: Tensor,
    bases: Tensor,
    *,
    method: str = "auto",
    reorthogonalize_above: Optional[float] = F.REORTHOGONALIZE_ABOVE,
    check_finite: bool = True,
) -> Tensor:
    """``F.lie_rotations`` at full precision: the registered op while tracing, the eager fast
    path otherwise (in float64 when float32 matmuls are reduced). ``method="matrix_exp"``
    (the reference) stays in the graph, in float64 while tracing.

    Shape:
        as ``F.lie_rotations``
    """
    if F.is_tracing():
        if method == "auto" and _keeps_series(positions, bases):
            out = torch.ops.liere.lie_rotations_keeping_series(
                positions, bases, reorthogonalize_above, check_finite
            )
            return out[0]
        if method == "auto":
            return torch.ops.liere.lie_rotations(
                positions, bases, reorthogonalize_above, check_finite
            )
        work = exact_dtype(bases.dtype, bases.device, tracing=True)
        out = F.lie_rotations(positions.to(work), bases.to(work), method=method)
        return out.to(bases.dtype)
    return _full_precision(
        F.lie_rotations,
        positions,
        bases,
        method=method,
        reorthogonalize_above=reorthogonalize_above,
        check_finite=check_finite,
    )


def _keeps_series(positions: Tensor, bases: Tensor) -> bool:
    """Whether a traced graph should hold ``liere::lie_rotations_keeping_series``: its inputs,
    and only the bases needing a gradient (the backward then reads what it kept); never an
    exported graph (``torch.export`` traces for inference: the kept tensors would only be
    extra outputs)."""
    exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.4
    return (
        torch.is_grad_enabled()
        and bases.requires_grad
        and not positions.requires_grad
        and not (exporting is not None and exporting())
        and keeps_series(positions, bases)
    )


def blockwise(x: Tensor, rotations: Tensor) -> Tensor:
    """``F.apply_blockwise`` at full precision (the registered op while tracing)."""
    if F.is_tracing():
        return torch.ops.liere.apply_blockwise(x, rotations)
    return _full_precision(F.apply_blockwise, x, rotations)


def blockwise_pair(
    q: Tensor, k: Tensor, rotations: Tensor, *, num_prefix_tokens: int = 0
) -> tuple[Tensor, Tensor]:
    """``F.apply_blockwise_pair`` at full precision (the registered op while tracing)."""
    if F.is_tracing():
        out: tuple[Tensor, Tensor] = torch.ops.liere.apply_blockwise_pair(
            q, k, rotations, num_prefix_tokens
        )
        return out
    return _pair_full_precision(q, k, rotations, num_prefix_tokens)


# -- RoPE ----------------------------------------------------------------------------------
# Note [complex RoPE]: turning channel pairs is multiplying complex numbers, x' = x e^{i t}.
# ``F.apply_rope`` (the definition) spells it as four products, two sums and a stack over
# strided views of q and k: seven passes. In eager mode one complex multiplication over a
# complex view of x does it in one (the same products and sums, so the same values; autograd
# gives the real gradient). At ViT-S/16, batch 8, AxialRoPE's layer went from 1.23-1.27x to
# 1.08-1.15x the layer without encoding (docs/performance.md). Inside a traced graph the real
# formulation stays (inductor fuses it; complex support in compilers is patchy).


def _complex_view_ok(x: Tensor) -> bool:
    return (
        x.dtype in (torch.float32, torch.float64)
        and x.shape[-1] % 2 == 0
        and x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(st % 2 == 0 for st in x.stride()[:-1])
    )


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``F.apply_rope``: in eager mode the compiled kernel on the CPU with a table shared by
    the batch (Note [RoPE kernel] in ``liere.speed.rope``), otherwise one complex
    multiplication (Note [complex RoPE]).

    Shape:
        as ``F.apply_rope``
    """
    if rope_kernel_serves(x, None, cos, sin, 0):  # Note [RoPE kernel]
        return rope_kernel(x, None, cos, sin, 0, _rope_complex)[0]
    return _rope_complex(x, None, cos, sin, 0)[0]


def _rope_complex(x: Tensor, _k: None, cos: Tensor, sin: Tensor, _p: int) -> tuple[Tensor]:
    """``rope`` off the kernel, in ``rope_kernel``'s reference signature."""
    if F.is_tracing() or not _complex_view_ok(x) or cos.dtype != x.dtype or x.numel() == 0:
        return (F.apply_rope(x, cos, sin),)
    turn = torch.complex(cos, sin)
    out = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * turn
    return (torch.view_as_real(out).flatten(-2),)


def rope_pair(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, num_prefix_tokens: int = 0
) -> tuple[Tensor, Tensor]:
    """``F.apply_rope`` on q and k, the first ``num_prefix_tokens`` tokens unrotated. In eager
    mode on the CPU with tables shared by the batch, the compiled kernel (Note [RoPE kernel]
    in ``liere.speed.rope``); otherwise one complex multiplication each over the whole of q
    and k, the prefix tokens turned by angle 0 (exactly 1 + 0i), so no slicing and
    concatenating (Note [complex RoPE]).

    Shape:
        q, k ``(b, h, p + n, 2k)``; cos, sin broadcastable to ``(b, h, n, k)``
        -> ``(b, h, p + n, 2k)`` each
    """
    p = num_prefix_tokens
    if rope_kernel_serves(q, k, cos, sin, p):  # Note [RoPE kernel]
        q_rot, k_rot = rope_kernel(q, k, cos, sin, p, _rope_pair_complex)
        return q_rot, k_rot
    return _rope_pair_complex(q, k, cos, sin, p)


def _rope_pair_complex(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, p: int
) -> tuple[Tensor, Tensor]:
    fast = not F.is_tracing() and all(
        _complex_view_ok(t) and t.numel() > 0 and cos.dtype == t.dtype for t in (q, k)
    )
    if not fast:
        q_rot, k_rot = F.apply_rope(q[:, :, p:], cos, sin), F.apply_rope(k[:, :, p:], cos, sin)
        if p == 0:
            return q_rot, k_rot
        return torch.cat((q[:, :, :p], q_rot), dim=2), torch.cat((k[:, :, :p], k_rot), dim=2)
    turn = torch.complex(cos, sin)
    if p:
        ones = turn.new_ones((*turn.shape[:-2], p, turn.shape[-1]))
        turn = torch.cat((ones, turn), dim=-2)
    out = []
    for t in (q, k):
        out.append(torch.view_as_real(torch.view_as_complex(t.unflatten(-1, (-1, 2))) * turn))
    return out[0].flatten(-2), out[1].flatten(-2)

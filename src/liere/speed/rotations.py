"""The dispatch of the exponential: the few-token path, the fast path and ``lie_rotations``.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from liere import kernels as _kernels
from liere.definition import (
    block_generators,
    expm_skew_reference,
)

from . import rays as _rays
from .device import lie_rotations_generic
from .extrapolation import (
    REORTHOGONALIZE_ABOVE,
    _warn_if_inaccurate,
    expm_skew,
    reorthogonalize,
    squarings_for,
)
from .polynomial import (
    POLY,
    poly_series,
    poly_series_backward,
    poly_series_forward,
    poly_terms,
    poly_weights,
    series_shape,
    stack_axes,
    uses_polynomial,
)
from .rays import KernelRotations, RayPlan, RayProducts
from .taylor import (
    ENTRY_MAJOR_MAX_BLOCK,
    TAYLOR,
    _exp_by_squaring,
    _Squarings,
    _taylor_autograd,
    _taylor_series,
    _TaylorSeries,
    taylor_series_backward,
)
from .token_squarings import (
    KernelSquarings,
    _squaring_levels,
    _TakeTokens,
    spectral_norms,
    token_squarings,
)
from .tracing import is_tracing

# Note [few tokens]
# ~~~~~~~~~~~~~~~~
# Decoding rotates one token (or a handful) per step. There the fast path's fixed costs (exact
# spectral norms of every basis block, the position-polynomial coefficients, kernel set-up)
# dwarf the exponential itself, so up to FEW_TOKENS token rows (tokens times samples) the
# generators are built directly, bounded by their own norms (cheap for this few) and
# exponentiated by the same scaling-and-squaring Taylor series in a handful of plain
# autograd ops (``_taylor_autograd``). Measured with benchmarks/bench_decode.py (docs/decoding.md).
FEW_TOKENS = 8


def lie_rotations(
    positions: Tensor,
    bases: Tensor,
    *,
    method: str = "auto",
    reorthogonalize_above: Optional[float] = REORTHOGONALIZE_ABOVE,
    check_finite: bool = True,
) -> Tensor:
    """``R[.., h, n, m] = exp(sum_a p[.., n, a] B[h, a, m])`` for every token and block.

    The fast path never materialises an unscaled generator: the number of squarings comes
    from the bound ``||sum_a p_a B_a||_2 <= sum_a |p_a| ||B_a||_2`` (exact spectral norms of the
    few basis blocks; tight for skew-symmetric, hence normal, matrices) and ``2^-j`` is folded
    into the positions (or bases). With one or two axes each token gets its own ``j`` (Note
    [per-token squarings]) and the Taylor series of every token comes from one GEMM (Note
    [series as a polynomial in the positions]); with three, one ``j`` for all and
    Paterson-Stockmeyer per token (Note [Taylor scaling and squaring]). Tokens on a lattice
    that are integer multiples of other tokens (most grids) are products of two rotations
    along their ray instead (Note [products along rays]). The squarings and products run in
    the compiled kernels when they are built (Note [compiled kernels] in ``liere.kernels``),
    else in PyTorch ops. At most ``FEW_TOKENS`` token rows (decoding) take a lean direct path
    (Note [few tokens]). Float32 blocks whose norm bound exceeds ``reorthogonalize_above`` get
    one Newton-Schulz step (Note [re-orthogonalisation]; ``None`` turns it off). ``method`` as
    in ``expm_skew``.

    Off the CPU (GPUs, meta tensors) ``method="auto"`` runs ``lie_rotations_generic``, which
    reads at most one value on the host, and none with ``check_finite=False`` (Note [sync-free
    rotations]). On the CPU host reads cost nothing and ``check_finite`` is ignored: NaN/Inf
    always raise.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)`` (skew-symmetric)
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    size = bases.shape[-1]
    rows = math.prod(positions.shape[:-1])
    if rows == 0:  # no tokens, or an empty batch: nothing to exponentiate
        return expm_skew_reference(block_generators(positions, bases))
    if method != "auto" or size <= 2 or is_tracing():
        return expm_skew(block_generators(positions, bases), method=method)
    if bases.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lie_rotations computes in float32 or float64; got {bases.dtype}.")
    # Note [sync-free rotations]; also under torch.func transforms, whose wrapped tensors have
    # no memory for the CPU path's kernels and autograd Functions to read
    if positions.device.type != "cpu" or not (
        _kernels.has_storage(positions) and _kernels.has_storage(bases)
    ):
        return lie_rotations_generic(
            positions,
            bases,
            reorthogonalize_above=reorthogonalize_above,
            check_finite=check_finite,
        )
    if rows <= FEW_TOKENS:
        rot, few_bound, norm = _few_token_rotations(positions, bases, reorthogonalize_above)
        if few_bound is None:
            return rot
        return reorthogonalize(rot, few_bound, reorthogonalize_above, norm)
    rot, bound, norm = _fast_rotations(positions, bases)
    return reorthogonalize(rot, bound, reorthogonalize_above, norm)


def _few_token_rotations(
    positions: Tensor, bases: Tensor, threshold: Optional[float]
) -> tuple[Tensor, Optional[Tensor], float]:
    """Note [few tokens]: the rotations, the largest bound on a generator's 2-norm, and the
    per-block bounds when that exceeds ``threshold`` (else None: nothing to re-orthogonalise).

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)``
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``, and the bound without ``(s, s)``
    """
    gen = block_generators(positions, bases)
    size = gen.shape[-1]
    flat = gen.reshape(-1, size, size)
    with torch.no_grad():
        # ||G||_2 <= ||G||_F / sqrt(2) for skew-symmetric G: its eigenvalues come in pairs
        # +-i w, so w_max^2 <= sum w^2 = ||G||_F^2 / 2 (exact for 2x2 blocks; tighter than the
        # 1-norm at the paper's init: 22.6 against 34.8 for 8x8 blocks whose 2-norm is 21.0)
        per_block = torch.linalg.vector_norm(flat, dim=(-2, -1)).mul_(0.5**0.5)
        norm = float(per_block.max())
        over = threshold is not None and norm > threshold
        bound = per_block.view(gen.shape[:-2]) if over else None
    squarings = squarings_for(norm, flat.dtype)  # raises on NaN/Inf
    _warn_if_inaccurate(norm, flat.dtype)
    rot = _taylor_autograd(flat * 2.0**-squarings if squarings else flat, squarings)
    return rot.view(gen.shape), bound, norm


def _fast_rotations(positions: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, float]:
    """``lie_rotations``' fast path for many tokens, the per-block norm bound and its maximum.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)``
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``, and ``(.., h, n, m)``
    """
    with torch.no_grad():
        if not bool(torch.isfinite(bases).all()):
            squarings_for(math.nan)  # raises: NaN/Inf parameters
        sigma = spectral_norms(bases.detach())  # (h, a, m)
        bound = torch.matmul(positions.detach().abs().unsqueeze(-3), sigma)  # (.., h, n, m)
        norm = float(bound.amax()) if bound.numel() else 0.0
    _warn_if_inaccurate(norm, bases.dtype)
    if positions.dim() == 2 and positions.device.type == "cpu" and not positions.requires_grad:
        # Note [products along rays]
        if uses_polynomial(bases.dtype, bases.shape[1]):
            theta = POLY[bases.dtype][1]
        else:
            theta = TAYLOR[bases.dtype][2]
        js = token_squarings(bound.amax(dim=(-3, -1)), theta)
        plan = _rays.ray_plan(positions, js)
        if plan is not None:
            base = plan.base
            rotations, done = _direct_rotations(positions[base], bases, sigma, bound[:, base], plan)
            if done:
                return rotations, bound, norm
            split: Tensor = RayProducts.apply(rotations, plan)
            return split, bound, norm
    return _direct_rotations(positions, bases, sigma, bound)[0], bound, norm


def _series_inputs(
    positions: Tensor, js: Tensor, bases: Tensor, sigma: Tensor, degree: int
) -> tuple[Tensor, Tensor, int]:
    """The position monomials of every token scaled by ``2^-j`` (Note [per-token squarings])
    and the bases scaled by ``2^-e`` to norm < 1, the positions by ``2^e`` (Note [coefficient
    range]; powers of two: exact), and ``e``.

    Shape:
        positions ``(N, a)``; js ``(N,)``; bases ``(h, a, m, s, s)``; sigma ``(h, a, m)``
        -> weights ``(N, T)``, scaled bases as ``bases``
    """
    scaled, e = _scaled_bases(bases, sigma)
    scale = torch.exp2(e - js.to(positions.dtype)).unsqueeze(-1)
    weights = poly_weights(positions * scale, degree)
    return weights, scaled, e


def _scaled_bases(bases: Tensor, sigma: Tensor) -> tuple[Tensor, int]:
    """The bases scaled by ``2^-e`` to norm < 1 (Note [coefficient range]), and ``e``."""
    e = math.frexp(float(sigma.amax()))[1] if sigma.numel() else 0
    return (bases * 2.0**-e if e else bases), e


# Note [series kept for the backward operator]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# In a compiled graph the rotations' forward and backward are two operators (Note [registered
# operators] in ``liere.ops``), and the backward (``bases_vjp``) used to recompute what the
# eager path's autograd Functions keep: the spectral norms, the monomials, the coefficients
# and the series GEMM (about 1.8 ms per call at ViT-S/16 with 8x8 blocks, by ``cProfile``;
# the operator took 4.8 ms recomputing them and 3.1 ms reading them, benchmarks/bench_ops.py).
# For one or two axes ``rotations_keeping_series`` returns them beside the rotations
# (``KeptSeries``), in buffers whose sizes follow from the input shapes alone, as a fake
# implementation needs: the directly computed tokens, which the ray plan picks by value, fill
# the leading rows, and the backward finds how many from the same plan. Where the forward
# did not run this way (NaN/Inf, re-orthogonalised blocks, more squarings than the kernels
# take) it returns the plain fast path's rotations with NaN norms, and the backward
# recomputes as before.


def kernel_series_layout(size: int) -> str:
    """The series' layout where the squarings kernels take it: entry-major for blocks up to
    8x8 (Note [small-block layout]), else "rows" (Note [series in rows])."""
    return "entry" if size <= ENTRY_MAJOR_MAX_BLOCK else "rows"


class KeptSeries(NamedTuple):
    """What the forward operator keeps for ``bases_vjp`` (Note [series kept for the backward
    operator])."""

    sigma: Tensor  # (h, a, m) spectral norms of the bases; NaN: nothing kept
    weights: Tensor  # (n, T): the directly computed tokens' monomials in the leading rows
    coefficients: Tensor  # (h*m, s, T*s)
    series: Tensor  # (n*h*m*s*s,): their series, in the squarings' layout, leading entries


def kept_series_shapes(
    positions_shape: Sequence[int], bases_shape: Sequence[int], dtype: torch.dtype
) -> tuple[tuple[int, ...], ...]:
    """The shapes of ``KeptSeries``' tensors for these inputs (``keeps_series`` cases)."""
    h, a, m, s, _ = bases_shape
    n = positions_shape[0]
    terms = poly_terms(POLY[dtype][0], a)
    return ((h, a, m), (n, terms), (h * m, s, terms * s), (n * h * m * s * s,))


def keeps_series(positions: Tensor, bases: Tensor) -> bool:
    """Whether ``rotations_keeping_series`` serves these inputs, from shapes, dtypes and
    devices alone (so a tracer can decide): shared CPU positions of one or two axes, more than
    ``FEW_TOKENS`` tokens, blocks the kernels take. (Without the kernels built it returns the
    rotations and keeps nothing.)"""
    size = bases.shape[-1]
    return (
        positions.dim() == 2
        and bases.dim() == 5
        and positions.shape[0] > FEW_TOKENS
        and size > 2
        and size in _kernels.SIZES
        and size in _kernels.RAY_SIZES
        and positions.dtype == bases.dtype
        and uses_polynomial(bases.dtype, bases.shape[1])
        and positions.device.type == "cpu"
        and bases.device.type == "cpu"
    )


@torch.no_grad()
def rotations_keeping_series(
    positions: Tensor, bases: Tensor, reorthogonalize_above: Optional[float]
) -> tuple[Tensor, KeptSeries]:
    """``lie_rotations(positions, bases)`` without autograd, and what ``bases_vjp`` needs
    (Note [series kept for the backward operator]). For ``keeps_series`` inputs.

    Shape:
        positions ``(n, a)``; bases ``(h, a, m, s, s)`` -> ``(h, n, m, s, s)`` and
        ``kept_series_shapes``
    """
    shapes = kept_series_shapes(positions.shape, bases.shape, bases.dtype)
    weights_shape, series_shape = shapes[1], shapes[3]
    usable = _kernels.usable(bases, positions, size=bases.shape[-1])
    sigma = spectral_norms(bases) if usable and bool(torch.isfinite(bases).all()) else None
    direct = None if sigma is None else _direct_plan(positions, bases, sigma, reorthogonalize_above)
    if sigma is None or direct is None:
        rot = lie_rotations(positions, bases, reorthogonalize_above=reorthogonalize_above)
        return rot, kept_nothing(positions.shape, bases)
    _warn_if_inaccurate(direct.norm, bases.dtype)
    h, a, m, size, _ = bases.shape
    degree = POLY[bases.dtype][0]
    layout = kernel_series_layout(size)
    plan, js = direct.plan, direct.js
    weights, scaled, _ = _series_inputs(direct.positions, js, bases, sigma, degree)
    # the rows past the directly computed tokens' are zeros: an operator's outputs are
    # determined by its inputs
    kept_weights = bases.new_zeros(weights_shape)
    kept_weights[: weights.shape[0]] = weights
    series_buffer = bases.new_empty(series_shape)
    series, coefficients, _ = poly_series_forward(
        stack_axes(scaled), weights, degree, layout, series_buffer
    )
    series_buffer[series.numel() :].zero_()
    js32 = js.to(torch.int32)
    if plan is None:
        rot = _kernels.squarings_forward(series, js32, h, m, layout)
    else:
        rot = _kernels._fresh(series, h, plan.n, m, size, size)
        _kernels.rotations_forward(series, js32, h, m, layout, rot, plan.base, *plan.items)
    return rot, KeptSeries(sigma, kept_weights, coefficients, series_buffer)


def kept_nothing(positions_shape: Sequence[int], bases: Tensor) -> KeptSeries:
    """``KeptSeries`` that says nothing was kept: NaN norms, zeros."""
    shapes = kept_series_shapes(positions_shape, bases.shape, bases.dtype)
    sigma = bases.new_full(shapes[0], math.nan)
    return KeptSeries(sigma, *(bases.new_zeros(shape) for shape in shapes[1:]))


class _DirectPlan(NamedTuple):
    plan: Optional[RayPlan]
    positions: Tensor  # (N, a): the directly computed tokens'
    bound: Tensor  # (h, N, m): their per-block norm bounds
    js: Tensor  # (N,): their squaring counts
    norm: float  # the largest bound of all tokens


def _direct_plan(
    positions: Tensor, bases: Tensor, sigma: Tensor, reorthogonalize_above: Optional[float]
) -> Optional[_DirectPlan]:
    """The fast path's plan on the kernels for shared positions, as ``_fast_rotations`` makes
    it. ``None`` where the kernels would not run it (NaN/Inf, blocks to re-orthogonalise, more
    squarings than the kernels take, products along rays the kernels do not serve)."""
    size = bases.shape[-1]
    bound = torch.matmul(positions.abs().unsqueeze(-3), sigma)  # (h, n, m)
    token_bound = bound.amax(dim=(-3, -1))
    norm = float(token_bound.amax())
    if not math.isfinite(norm):
        return None
    if bases.dtype == torch.float32 and reorthogonalize_above is not None:
        if norm > reorthogonalize_above:
            return None
    poly = uses_polynomial(bases.dtype, bases.shape[1])
    theta = POLY[bases.dtype][1] if poly else TAYLOR[bases.dtype][2]
    js = token_squarings(token_bound, theta)
    plan = _rays.ray_plan(positions, js)
    if plan is not None:
        if not _kernels.usable(bases, size=size, sizes=_kernels.RAY_SIZES):
            return None
        positions, bound, js = positions[plan.base], bound[:, plan.base], js[plan.base]
    if poly and int(js.max()) > _kernels.MAX_SQUARINGS:
        return None
    return _DirectPlan(plan, positions, bound, js, norm)


def bases_vjp(
    grad: Tensor,
    positions: Tensor,
    bases: Tensor,
    rotations: Tensor,
    reorthogonalize_above: Optional[float],
    kept: Optional[KeptSeries] = None,
) -> Optional[Tensor]:
    """The gradient of ``rotations = lie_rotations(positions, bases)`` with respect to the
    bases, computed without autograd from the forward's output, for the registered backward
    operator (whose implementation cannot record an autograd graph: Note [registered
    operators] in ``liere.ops``). It runs the hand-written backwards in turn: products along
    rays, squarings, series, coefficients. The squarings and products are never run forward
    again; the series is recomputed (one GEMM of the position polynomial, or Paterson-Stockmeyer
    with three axes) unless ``kept`` holds it (Note [series kept for the backward operator]).

    Covers the fast path whenever it runs on the compiled kernels: shared CPU positions, more
    than ``FEW_TOKENS`` tokens, nothing re-orthogonalised; one or two axes, or three with
    blocks up to 8x8. Anything else returns ``None`` (the caller differentiates a recompute).

    Shape:
        grad, rotations ``(h, n, m, s, s)``; positions ``(n, a)``; bases ``(h, a, m, s, s)``
        -> ``(h, a, m, s, s)``
    """
    size = bases.shape[-1]
    poly = uses_polynomial(bases.dtype, bases.shape[1])
    if (
        positions.dim() != 2
        or positions.shape[0] <= FEW_TOKENS
        or size <= 2
        or positions.dtype != bases.dtype
        or rotations.dtype != bases.dtype
        or not (poly or size <= ENTRY_MAJOR_MAX_BLOCK)
        or not _kernels.usable(bases, positions, rotations, size=size)
    ):
        return None
    if kept is not None and (kept.sigma.dtype != bases.dtype or bool(kept.sigma.isnan().any())):
        kept = None
    sigma = spectral_norms(bases) if kept is None else kept.sigma
    direct = _direct_plan(positions, bases, sigma, reorthogonalize_above)
    if direct is None:
        return None
    if poly:  # the products along rays' backward inside the squarings' kernel call
        return _polynomial_bases_vjp(grad.contiguous(), rotations, direct, bases, sigma, kept)
    plan = direct.plan
    if plan is None:
        d_direct = grad.contiguous()
    else:
        d_direct = _kernels.ray_products_backward(
            rotations, grad.contiguous(), plan.base, *plan.items
        )
    return _taylor_bases_vjp(d_direct, direct.positions, direct.bound, bases)


def _polynomial_bases_vjp(
    grad: Tensor,
    rotations: Tensor,
    direct: _DirectPlan,
    bases: Tensor,
    sigma: Tensor,
    kept: Optional[KeptSeries],
) -> Tensor:
    """``bases_vjp`` with one or two axes: products along rays (if any) and squarings in one
    kernel call, then the series product and coefficient recursion backwards (Note [series as
    a polynomial in the positions]), the series from ``kept`` when given. ``grad``: that of
    every token (contiguous)."""
    size = bases.shape[-1]
    h, a, m = bases.shape[:3]
    degree = POLY[bases.dtype][0]
    positions, js = direct.positions, direct.js
    layout = kernel_series_layout(size)
    count = positions.shape[0]
    if kept is None:
        weights, scaled, e = _series_inputs(positions, js, bases, sigma, degree)
        stacked = stack_axes(scaled)
        series, coefficients, _ = poly_series_forward(stacked, weights, degree, layout)
    else:
        scaled, e = _scaled_bases(bases, sigma)
        stacked = stack_axes(scaled)
        weights, coefficients = kept.weights[:count], kept.coefficients
        shape = series_shape(h * m, size, count, layout)
        series = kept.series[: math.prod(shape)].view(shape)
    js32, plan = js.to(torch.int32), direct.plan
    if plan is None:
        d_series = _kernels.squarings_backward(series, js32, grad, h, m, layout)
    else:
        dst, left, right = plan.items
        d_series = _kernels.rotations_backward(
            series, js32, rotations, grad, plan.base, dst, left, right, h, m, layout
        )
    d_stacked = poly_series_backward(d_series, stacked, coefficients, weights, degree, layout)
    # undo stack_axes: (h*m, a*s, s) -> (h, a, m, s, s)
    d_scaled = d_stacked.view(h * m, a, size, size).transpose(0, 1).reshape(a, h, m, size, size)
    d_scaled = d_scaled.transpose(0, 1)
    return (d_scaled * 2.0**-e if e else d_scaled).contiguous()


def _taylor_bases_vjp(
    grad: Tensor, positions: Tensor, bound: Tensor, bases: Tensor
) -> Optional[Tensor]:
    """``bases_vjp`` for the directly computed tokens with three or more axes and blocks up
    to 8x8: one squaring count for all (Note [Taylor scaling and squaring]), generators built
    entry-major (Note [small-block layout]); squarings, then series backward."""
    size = bases.shape[-1]
    h, m = bases.shape[0], bases.shape[2]
    squarings = squarings_for(float(bound.amax()), bases.dtype)
    if squarings > _kernels.MAX_SQUARINGS:
        return None
    scaled = bases * (2.0**-squarings) if squarings else bases
    gen = torch.matmul(positions, scaled.permute(3, 4, 0, 1, 2))  # (s, s, h, n, m)
    powers, horner = _taylor_series(gen.reshape(size, size, -1), True, True)
    count = positions.shape[0]
    js = torch.full((count,), squarings, dtype=torch.int32)
    d_series = _kernels.squarings_backward(horner[-1], js, grad, h, m, "entry-hnm")
    d_gen = taylor_series_backward(d_series, (*powers, *horner[:-1]), True)
    d_entries = torch.matmul(positions.mT, d_gen.view(size, size, h, count, m))  # (s, s, h, a, m)
    d_scaled = d_entries.permute(2, 3, 4, 0, 1)
    return (d_scaled * 2.0**-squarings if squarings else d_scaled).contiguous()


def _direct_rotations(
    positions: Tensor,
    bases: Tensor,
    sigma: Tensor,
    bound: Tensor,
    plan: Optional[RayPlan] = None,
) -> tuple[Tensor, bool]:
    """``lie_rotations``' fast path for every token; ``sigma``: the spectral norms of the
    bases, ``bound``: the per-token, per-block norm bound (both without gradient). With
    ``plan`` (``positions`` are then its directly computed tokens) the compiled kernels may do
    the products along rays too: the flag says whether they did (the result then covers all
    ``plan.n`` tokens).

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)``; sigma ``(h, a, m)``;
        bound ``(.., h, n, m)`` -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    size = bases.shape[-1]
    h, a, m = bases.shape[:3]
    norm = float(bound.amax()) if bound.numel() else 0.0
    entry_major = size <= ENTRY_MAJOR_MAX_BLOCK
    batch = positions.shape[:-1]  # (n,) or (b, n)
    if uses_polynomial(bases.dtype, a):
        squarings_for(norm, bases.dtype)  # raises on NaN/Inf
        flat_pos = positions.reshape(-1, a)
        count = flat_pos.shape[0]
        token_bound = bound.amax(dim=(-3, -1)).reshape(-1)
        # the same degree and squaring counts with or without the compiled kernels (Note
        # [series as a polynomial in the positions]): degree 8 with more squarings was a little
        # faster there but lost accuracy (each squaring doubles the rounding error: 1.8e-5
        # instead of 7.5e-6 off orthogonal on the paper's 14x14 grid)
        degree, theta = POLY[bases.dtype]
        js = token_squarings(token_bound, theta)
        kernel = (
            _kernels.usable(bases, positions, size=size)
            and (int(js.max()) if js.numel() else 0) <= _kernels.MAX_SQUARINGS
        )
        counts, order = ((), None) if kernel else _squaring_levels(js)
        if order is not None:
            flat_pos, js = flat_pos[order], js[order]
        weights, scaled, _ = _series_inputs(flat_pos, js, bases, sigma, degree)
        layout = kernel_series_layout(size) if kernel else "entry" if entry_major else "batch"
        series = poly_series(stack_axes(scaled), weights, degree, layout)
        if kernel:
            if plan is not None and _kernels.usable(bases, size=size, sizes=_kernels.RAY_SIZES):
                full: Tensor = KernelRotations.apply(
                    series, js.to(torch.int32), h, m, layout, plan
                )  # (h, plan.n, m, s, s)
                return full, True
            rot: Tensor = KernelSquarings.apply(
                series, js.to(torch.int32), h, m, layout
            )  # (h, N, m, s, s)
        else:
            out: Tensor = _Squarings.apply(series, counts, entry_major) if counts else series
            if entry_major:  # -> (h, N, m, s, s)
                rot = out.view(size, size, h, m, count).permute(2, 4, 3, 0, 1)
            else:
                rot = out.view(count, h, m, size, size).transpose(0, 1)
            rot = rot.contiguous()
            if order is not None:  # back to the callers' token order (contiguous rows: cheap)
                rot = _TakeTokens.apply(rot, torch.argsort(order), order)
        if len(batch) == 1:
            return rot, False
        return rot.view(h, *batch, m, size, size).transpose(0, 1).contiguous(), False
    squarings = squarings_for(norm, bases.dtype)
    scaled = bases * (2.0**-squarings) if squarings else bases
    if not entry_major:
        gen = block_generators(positions, scaled)
        out = _exp_by_squaring(gen.reshape(-1, size, size), squarings, False)
        return out.view(gen.shape), False
    # Note [small-block layout]: generators built entry-major directly (transposing a batch of
    # this size in and out costs more than the series on the 3-axis grids this path serves),
    # gen[i, j, .., h, n, m] = sum_a p[.., n, a] B[h, a, m, i, j]
    entries = scaled.permute(3, 4, 0, 1, 2)  # (s, s, h, a, m)
    if positions.dim() == 3:
        gen = torch.matmul(positions.unsqueeze(-3), entries.unsqueeze(2))  # (s, s, b, h, n, m)
    else:
        gen = torch.matmul(positions, entries)  # (s, s, h, n, m)
        if _kernels.usable(bases, positions, size=size) and squarings <= _kernels.MAX_SQUARINGS:
            taylor: Tensor = _TaylorSeries.apply(gen.reshape(size, size, -1), True)
            js = torch.full((positions.shape[0],), squarings, dtype=torch.int32)
            kernel_rot: Tensor = KernelSquarings.apply(taylor, js, h, m, "entry-hnm")
            return kernel_rot, False
    out = _exp_by_squaring(gen.reshape(size, size, -1), squarings, True)
    shape = gen.shape[2:]
    out = out.view(size, size, *shape).permute(*range(2, 2 + len(shape)), 0, 1)
    return out.contiguous(), False

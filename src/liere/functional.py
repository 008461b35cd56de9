"""The speed layer's tensor maths: fast ``x' = exp(sum_a p_a A_a) x`` (the definition, the
reference path and the notation are in ``liere.definition``, re-exported here).

Axis letters used in every ``Shape:`` section: ``b`` batch, ``h`` heads, ``n`` tokens,
``d`` head_dim, ``a`` position axes, ``m`` blocks per head (``d // s``), ``s`` block size,
``k`` rotary pairs (``d // 2``).

Nothing here owns parameters; the modules in ``liere.encodings`` call these functions.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from liere import kernels as _kernels

from .definition import (
    apply_blockwise_exact,
    apply_rope,
    block_generators,
    expm_skew_reference,
    rope_angles,
    skew_symmetric,
    upper_triangle_index,
)

__all__ = [
    "skew_symmetric",
    "upper_triangle_index",
    "block_generators",
    "expm_skew",
    "expm_skew_reference",
    "lie_rotations",
    "squarings_for",
    "reorthogonalize",
    "rotation_error_bound",
    "apply_blockwise",
    "apply_blockwise_pair",
    "rope_angles",
    "apply_rope",
    "compute_dtype",
    "apply_blockwise_exact",
]

# Note [Taylor scaling and squaring]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# exp(G) = exp(G / 2^j)^(2^j). We pick one j for the whole batch so that the scaled
# generators have norm <= theta, evaluate a truncated Taylor series with Paterson-Stockmeyer
# (few matrix products for a high degree) and square j times. With ||X|| <= theta the
# truncation error is below theta^(deg+1)/(deg+1)!: float32 uses degree 11 with theta = 1.3
# (5e-8, under the unit roundoff 6e-8), float64 degree 19 with theta = 1 (4e-19 < 1.1e-16).
# Each squaring at most doubles the error already there, so the final error grows like
# ||G|| * eps: this is why the orthogonality tolerance carries a max(1, ||A||) factor.
# One j for all matrices (instead of torch.matrix_exp's per-matrix choice) keeps the batch in a
# handful of large batched products, and the backward costs two products per forward product
# (matrix_exp's backward costs about 8x its forward). lie_rotations with one or two axes
# replaces the per-token series by one GEMM (Note [series as a polynomial in the positions]).
# (k powers, chunks, theta): degree k * chunks - 1
_TAYLOR = {torch.float32: (4, 3, 1.3), torch.float64: (5, 4, 1.0)}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype rotations are built in: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# Note [small-block layout]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# Batched products of many tiny matrices are slow through BLAS: on a 2-core AVX-512 CPU,
# torch.bmm of 9,408 8x8 matrices runs at about 9 GFLOP/s (most of the time is per-matrix
# overhead). Blocks up to _ENTRY_MAJOR_MAX_BLOCK are therefore exponentiated "entry-major":
# a batch is stored as (s, s, N), each matrix entry a contiguous row over the batch, and a
# product C = A @ B is s fused multiply-adds over whole rows,
# C[:, :] += A[:, j, None] * B[None, j, :] (j = 0..s-1): vectorised elementwise work with no
# per-matrix cost. Transposes are free (swap the first two dims). Larger blocks use bmm.
_ENTRY_MAJOR_MAX_BLOCK = 8


# Rows of this many matrices at a time keep the accumulator of an entry-major product in
# cache (8x8: 4 MB); one pass over a 100 MB accumulator is memory-bound and ~5x slower.
_ENTRY_MAJOR_CHUNK = 16384


def _entry_major_mm(
    a: Tensor, b: Tensor, out: Optional[Tensor] = None, accumulate: bool = True
) -> Tensor:
    """``a @ b`` for entry-major batches ``(s, s, *batch)``, into ``out`` if given (``out +=``
    when ``accumulate``). Views whose last dim is a slice of a larger batch are fine."""
    size, count = a.shape[1], a.shape[-1]
    add = out is not None and accumulate
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1], *a.shape[2:])
    chunk = max(1, _ENTRY_MAJOR_CHUNK // max(1, math.prod(a.shape[2:-1])))
    for lo in range(0, count, chunk):
        hi = min(lo + chunk, count)
        o, a_c, b_c = out[..., lo:hi], a[..., lo:hi], b[..., lo:hi]
        start = 0
        if not add:
            torch.mul(a_c[:, 0:1], b_c[0:1], out=o)
            start = 1
        for j in range(start, size):
            o.addcmul_(a_c[:, j : j + 1], b_c[j : j + 1])
    return out


def _batch_mm(
    a: Tensor, b: Tensor, out: Optional[Tensor] = None, accumulate: bool = True
) -> Tensor:
    """``a @ b`` for batch-major ``(*batch, s, s)`` (leading dims mergeable into one batch),
    into ``out`` if given (``out +=`` when ``accumulate``)."""
    s = a.shape[-1]
    a3, b3 = a.reshape(-1, s, s), b.reshape(-1, s, s)
    if out is None:
        return torch.bmm(a3, b3).view(a.shape)
    o3 = out.view(-1, s, s)
    if accumulate:
        o3.baddbmm_(a3, b3)
    else:
        torch.bmm(a3, b3, out=o3)
    return out


def _taylor_series(x: Tensor, entry_major: bool, keep: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Powers ``X..X^k`` and Horner steps of the Paterson-Stockmeyer series; the last Horner
    step is ``T(X)``. With ``keep=False`` only ``[T(X)]`` comes back (intermediates dropped
    as soon as possible)."""
    mm, _, diag = _layout(entry_major)
    k, chunks, _ = _TAYLOR[x.dtype]
    powers = [x]
    for _ in range(k - 1):
        powers.append(mm(powers[-1], x))
    blocks = []
    for c in range(chunks):
        first = c * k
        block = powers[0] * (1.0 / math.factorial(first + 1))
        for i in range(2, k):
            block.add_(powers[i - 1], alpha=1.0 / math.factorial(first + i))
        diag(block).add_(1.0 / math.factorial(first))
        blocks.append(block)
    top = powers[-1]
    if not keep:
        powers = []
    horner = [blocks.pop()]
    while blocks:
        horner.append(mm(horner[-1], top, out=blocks.pop()))
        if not keep:
            horner = horner[-1:]
    return powers, horner


def _as_batch_major(t: Tensor, entry_major: bool) -> Tensor:
    return t.permute(2, 0, 1) if entry_major else t


class _TaylorSeries(torch.autograd.Function):
    """``T(X)``, the truncated Taylor series of exp (Note [Taylor scaling and squaring]), with
    a hand-written backward: the steps in reverse, two products per forward product,
    accumulating in place (autograd through the same code allocates a fresh tensor for every
    partial product). ``entry_major`` selects the layout (Note [small-block layout]).
    The series and the squarings are two Functions so that autograd frees the squarings'
    saved batches before the series' backward allocates its own."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, entry_major: bool) -> Tensor:
        keep = ctx.needs_input_grad[0]
        powers, horner = _taylor_series(x, entry_major, keep)
        if keep:
            ctx.save_for_backward(*powers, *horner[:-1])
        ctx.entry_major = entry_major
        return horner[-1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None]:
        entry_major = ctx.entry_major
        mm, tr, _ = _layout(entry_major)
        saved = ctx.saved_tensors
        x = saved[0]
        k, chunks, _ = _TAYLOR[x.dtype]
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            with torch.enable_grad():
                out = _taylor_autograd(_as_batch_major(x, entry_major), 0)
                out = out.permute(1, 2, 0) if entry_major else out
                (d_x,) = torch.autograd.grad(out, x, grad, create_graph=True)
            return d_x, None
        powers, horner = saved[:k], saved[k:]
        # H_r = B_{chunks-1-r} + H_{r-1} @ X^k;  B_c = I/(ck)! + sum_{i<k} X^i/(ck+i)!
        d_powers: list[Optional[Tensor]] = [None] * k

        def add_block_grad(c: int, d_block: Tensor) -> None:
            for i in range(1, k):
                coef = 1.0 / math.factorial(c * k + i)
                acc = d_powers[i - 1]
                d_powers[i - 1] = d_block * coef if acc is None else acc.add_(d_block, alpha=coef)

        g = grad.contiguous()
        for r in reversed(range(1, chunks)):
            add_block_grad(chunks - 1 - r, g)
            d_powers[k - 1] = mm(tr(horner[r - 1]), g, out=d_powers[k - 1])
            g = mm(g, tr(powers[-1]))
        add_block_grad(chunks - 1, g)
        # X^(i+1) = X^i @ X
        d_x = d_powers[0]
        assert d_x is not None
        for i in reversed(range(1, k)):
            d_next = d_powers[i]
            if d_next is not None:  # d_powers[0] is d_x
                mm(tr(powers[i - 1]), d_next, out=d_x)
                mm(d_next, tr(x), out=d_powers[i - 1])
        return d_x, None


class _Squarings(torch.autograd.Function):
    """``T^(2^j_n)`` for each token ``n`` by squarings, with tokens sorted by ``j_n``
    (descending) so that squaring ``l`` works on the prefix of ``counts[l-1]`` tokens (Note
    [per-token squarings]); ``counts = (N,) * j`` squares everything ``j`` times. Backward
    ``G <- G S^T + S^T G`` per squaring on the same prefixes, in two reused buffers (see
    ``_TaylorSeries``). The token dim is the last one entry-major, the first batch-major."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, counts: tuple[int, ...], entry_major: bool) -> Tensor:
        mm, _, _ = _layout(entry_major)
        tok = _token_slicer(entry_major)
        keep = ctx.needs_input_grad[0]
        ctx.layout = (counts, entry_major)
        if not counts:
            return t.clone()
        n = t.shape[-1] if entry_major else t.shape[0]
        ends = (n, *counts, 0)
        out = t.new_empty(t.shape)
        if ends[1] < n:  # tokens needing no squaring
            tok(out, ends[1], n).copy_(tok(t, ends[1], n))
        saved, current = [t], t
        for level, count in enumerate(counts, start=1):
            prev = tok(current, 0, count)
            if level == len(counts):  # the last squaring writes straight into the result
                mm(prev, prev, out=tok(out, 0, count), accumulate=False)
                break
            current = mm(prev, prev)
            lo = ends[level + 1]
            if count > lo:  # tokens final at this level
                tok(out, lo, count).copy_(tok(current, lo, count))
            if keep:
                saved.append(current)
        if keep:
            ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
        counts, entry_major = ctx.layout
        mm, tr, _ = _layout(entry_major)
        tok = _token_slicer(entry_major)
        if not counts:
            return grad, None, None
        squares = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            t = squares[0]
            with torch.enable_grad():
                out = _squarings_plain(t, counts, entry_major)
                (d_t,) = torch.autograd.grad(out, t, grad, create_graph=True)
            return d_t, None, None
        grad = grad.contiguous()
        n = grad.shape[-1] if entry_major else grad.shape[0]
        ends = (n, *counts, 0)
        src = grad  # read-only; results go to two ping-pong buffers
        buffers = [grad.new_empty(grad.shape), None]
        for step, level in enumerate(reversed(range(len(counts)))):  # S_(l+1) = S_l @ S_l
            count = counts[level]
            dst = buffers[step % 2]
            if dst is None:
                dst = buffers[step % 2] = grad.new_empty(grad.shape)
            s, g = tok(squares[level], 0, count), tok(src, 0, count)
            o = mm(g, tr(s), out=tok(dst, 0, count), accumulate=False)
            mm(tr(s), g, out=o)
            lo, hi = count, ends[level]  # tokens joining: final at this level
            if hi > lo:
                tok(dst, lo, hi).copy_(tok(grad, lo, hi))
            src = dst
        return src, None, None


def _token_slicer(entry_major: bool) -> Any:
    """``x[tokens lo:hi]`` along the token dim of a layout (last entry-major, first
    batch-major)."""
    if entry_major:
        return lambda x, lo, hi: x[..., lo:hi]
    return lambda x, lo, hi: x[lo:hi]


def _squarings_plain(t: Tensor, counts: tuple[int, ...], entry_major: bool) -> Tensor:
    """``_Squarings`` in plain autograd ops (double backward): ``_token_squarings_plain`` with
    every (head, block) of a token as one block dim, back in ``t``'s layout."""
    n = t.shape[-1] if entry_major else t.shape[0]
    size = t.shape[0] if entry_major else t.shape[-1]
    js = (
        torch.arange(n, device=t.device).unsqueeze(0)
        < torch.tensor(counts, device=t.device).unsqueeze(1)
    ).sum(0)
    blocks = t.numel() // (n * size * size)
    out = _token_squarings_plain(t, js, 1, blocks, "entry" if entry_major else "batch")[0]
    return (out.permute(2, 3, 1, 0) if entry_major else out).reshape(t.shape)


def _layout(entry_major: bool) -> tuple[Any, Any, Any]:
    """(product, transpose, diagonal) for the entry-major ``(s, s, N)`` or batch-major
    ``(N, s, s)`` layout."""
    if entry_major:
        return _entry_major_mm, (lambda t: t.transpose(0, 1)), (lambda t: t.diagonal(0, 0, 1))
    return _batch_mm, (lambda t: t.mT), (lambda t: t.diagonal(0, -2, -1))


def _taylor_autograd(x: Tensor, squarings: int) -> Tensor:
    """The series of ``_TaylorSeries`` and ``squarings`` squarings in plain autograd ops
    (batch-major; differentiable to any order): double backward, and the few-token path
    (Note [few tokens]), where the fewest launched ops win.

    Shape:
        ``(N, s, s)`` -> ``(N, s, s)``
    """
    k, chunks, _ = _TAYLOR[x.dtype]
    powers = [x]
    for _ in range(k - 1):
        powers.append(torch.bmm(powers[-1], x))
    top = powers.pop()  # X^k
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x)
    # Paterson-Stockmeyer chunk c: sum_{i<k} X^i / (c k + i)!, all chunks in one contraction
    table = _PS_TABLES[x.dtype]  # (chunks, k)
    if table.device != x.device:
        table = table.to(x.device)
    stacked = torch.stack([eye, *powers])  # (k, N, s, s)
    blocks = torch.mm(table, stacked.view(k, -1)).view(chunks, *x.shape)
    result = blocks[-1]
    for c in reversed(range(chunks - 1)):
        result = torch.baddbmm(blocks[c], result, top)
    for _ in range(squarings):
        result = torch.bmm(result, result)
    return result


# Paterson-Stockmeyer weights 1 / (c k + i)!: (chunks, k) per dtype (constants)
_PS_TABLES = {
    dtype: torch.tensor(
        [[1.0 / math.factorial(c * k + i) for i in range(k)] for c in range(chunks)], dtype=dtype
    )
    for dtype, (k, chunks, _) in _TAYLOR.items()
}


def _taylor_expm_squared(x: Tensor, squarings: int) -> Tensor:
    """``T(X)^(2^squarings)`` with ``T`` the truncated Taylor series of exp; ``X`` already scaled.

    Shape:
        ``(N, s, s)`` -> ``(N, s, s)``
    """
    if x.shape[-1] <= _ENTRY_MAJOR_MAX_BLOCK:
        return _exp_by_squaring(x.permute(1, 2, 0).contiguous(), squarings, True).permute(2, 0, 1)
    return _exp_by_squaring(x.contiguous(), squarings, False)


def _exp_by_squaring(x: Tensor, squarings: int, entry_major: bool) -> Tensor:
    """``T(X)^(2^squarings)`` in the given layout (Note [small-block layout])."""
    series: Tensor = _TaylorSeries.apply(x, entry_major)
    if not squarings:
        return series
    count = x.shape[-1] if entry_major else x.shape[0]
    out: Tensor = _Squarings.apply(series, (count,) * squarings, entry_major)
    return out


# Note [extrapolation]: float32 rotations lose orthogonality in proportion to the generator
# norm. Measured by benchmarks/extrapolation.py (paper init, seed 0, 14x14 grid scaled):
# 8x8 blocks max|R^T R - I| = 1.25e-5 at 1x the training range (||G|| = 40), 8.4e-5 at 8x
# (||G|| = 318); dense 64x64 3.1e-5 at 1x (||G|| = 262), 2.3e-4 at 8x (||G|| = 2,096); about
# 1.1e-7 * ||G|| at large norms, at or below float32 torch.linalg.matrix_exp at every scale.
# The tests hold it to 10 * s * eps * max(1, ||G||). Past ||G|| = 2^14 the error passes 1e-3
# and keeps growing, so a RuntimeWarning says so; float64 inputs are accurate to about
# 1e-16 * ||G||.
LARGE_NORM = {torch.float32: 2.0**14, torch.float64: 2.0**40}

# Note [re-orthogonalisation]: past the training range, one Newton-Schulz step
# R <- R - R (R^T R - I) / 2, in float64, on the float32 rotations of the blocks whose
# generator-norm bound exceeds REORTHOGONALIZE_ABOVE, brings them back to float32 roundoff
# (the step squares the error). Blocks below the threshold keep the float32 drift, about
# 6e-8 * ||G|| in vector norms for dense blocks and 7e-8 * ||G|| for 8x8 ones
# (benchmarks/extrapolation.py, results/extrapolation.txt). Paper init, 14x14 grid: dense at
# 8x the training range keeps vector norms within 6.4e-5 (1.2e-4 without the step, 2.4e-4
# with float32 torch.linalg.matrix_exp), at +12 ms (34 against 22 ms for the rotations). The
# training range (||G|| = 40 for 8x8 blocks, 262 dense) never reaches the threshold: nothing
# runs there, the bound is already on the host.
REORTHOGONALIZE_ABOVE = 1024.0
# float64 blocks corrected at a time: small buffers the allocator reuses. Dense blocks at 8x
# the training range (629 of 1,176 corrected): +26 ms in one pass over them (fresh 20 MB
# buffers, page-faulted every call), +11 ms in chunks of 32 (the rotations alone: 22 ms)
_REORTHOGONALIZE_CHUNK = 32


def reorthogonalize(
    rotations: Tensor,
    bound: Tensor,
    threshold: Optional[float],
    norm: Optional[float] = None,
) -> Tensor:
    """One Newton-Schulz step, in float64, on the blocks whose ``bound`` exceeds
    ``threshold`` (Note [re-orthogonalisation]); the rest pass through untouched. ``None`` or
    float64 rotations: unchanged. ``norm``: ``bound``'s maximum when the caller has it on the
    host already (saves a device-to-host read).

    Shape:
        rotations ``(..., s, s)``; bound ``(...)`` -> ``(..., s, s)``
    """
    if threshold is None or rotations.dtype != torch.float32 or bound.numel() == 0:
        return rotations
    if norm is not None and norm <= threshold:
        return rotations
    index = (bound > threshold).reshape(-1).nonzero().squeeze(1)  # blocks to correct
    if index.numel() == 0:
        return rotations
    size = rotations.shape[-1]
    flat = rotations.reshape(-1, size, size)
    out = flat.clone()
    for chunk in index.split(_REORTHOGONALIZE_CHUNK):
        r = flat.index_select(0, chunk).double()
        error = torch.bmm(r.mT, r)
        error.diagonal(dim1=-2, dim2=-1).sub_(1.0)  # R^T R - I
        fixed = torch.baddbmm(r, r, error, alpha=-0.5)  # R - R (R^T R - I) / 2
        out.index_copy_(0, chunk, fixed.to(rotations.dtype))
    return out.view(rotations.shape)


def rotation_error_bound(norm: float, dtype: torch.dtype) -> float:
    """``2 * eps(dtype) * norm``: how far rotations computed in ``dtype`` may drift from
    orthogonal (and from the exact exponential) at generator norm ``norm`` (Note
    [extrapolation]: measured about ``1.1e-7 * ||G||`` in float32 on both paths, below
    ``2 * eps``). ``liere.testing``'s tolerances and the large-norm warning use it."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 2.0 * eps * norm


def _warn_if_inaccurate(norm: float, dtype: torch.dtype) -> None:
    if norm > LARGE_NORM.get(dtype, math.inf):
        warnings.warn(
            f"generator norm {norm:.3g} is beyond {LARGE_NORM[dtype]:.3g}: {dtype} rotations "
            f"lose accuracy (error up to about {rotation_error_bound(norm, dtype):.1e}). "
            f"Positions far outside the training range? Rescale them, or pass float64 q/k.",
            RuntimeWarning,
            stacklevel=3,
        )


def squarings_for(
    norm_bound: float, dtype: torch.dtype = torch.float32, *, theta: Optional[float] = None
) -> int:
    """Squarings ``j`` so that a generator of norm <= ``norm_bound`` scaled by ``2^-j`` is
    within the Taylor series' accurate range ``theta`` (default: the Paterson-Stockmeyer
    series' for ``dtype``, Note [Taylor scaling and squaring]); raises on NaN/Inf."""
    if not math.isfinite(norm_bound):
        raise ValueError(
            "the generators contain NaN or Inf (from non-finite positions or parameters); "
            "cannot exponentiate them."
        )
    theta = _TAYLOR[dtype][2] if theta is None else theta
    return max(0, math.ceil(math.log2(norm_bound / theta))) if norm_bound > theta else 0


def _squarings_for(gen: Tensor) -> int:
    # ||G||_2 <= ||G||_1 (= ||G||_inf for skew-symmetric G); the Taylor bound holds in any
    # submultiplicative norm.
    norm = float(gen.detach().abs().sum(dim=-2).amax()) if gen.numel() else 0.0
    return squarings_for(norm, gen.dtype)


def expm_skew(gen: Tensor, *, method: str = "auto") -> Tensor:
    """``exp(G)`` for a batch of skew-symmetric blocks ``G`` (any block size).

    ``method``:
        ``"auto"``: 1x1 blocks -> 1; 2x2 blocks in closed form
        (``[[cos t, sin t], [-sin t, cos t]]`` for ``G = [[0, t], [-t, 0]]``); larger blocks by
        scaling and squaring a Taylor series (Note [Taylor scaling and squaring]), or by
        ``torch.linalg.matrix_exp`` while being traced by ``torch.compile`` (the number of
        squarings depends on the data).
        ``"taylor"``: scaling and squaring for every block size.
        ``"matrix_exp"``: ``torch.linalg.matrix_exp``, the reference.

    Float32 and float64 are computed in their own precision; anything else is rejected
    (cast to float32 first; see ``compute_dtype``). Only the upper triangle of 2x2 blocks is
    read, so the input must really be skew-symmetric.

    Shape:
        ``(..., s, s)`` -> ``(..., s, s)``
    """
    if gen.dim() < 2 or gen.shape[-1] != gen.shape[-2]:
        raise ValueError(f"expected a batch of square blocks (..., s, s); got {tuple(gen.shape)}.")
    if gen.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"expm_skew computes in float32 or float64; got {gen.dtype}. Cast with .float() first."
        )
    if method not in ("auto", "taylor", "matrix_exp"):
        raise ValueError(f"method must be 'auto', 'taylor' or 'matrix_exp'; got {method!r}.")
    size = gen.shape[-1]
    if method == "matrix_exp" or (method == "auto" and size > 2 and is_tracing()):
        return expm_skew_reference(gen)
    if method == "auto" and size == 1:
        return torch.ones_like(gen)
    if method == "auto" and size == 2:
        t = gen[..., 0, 1]
        c, s = torch.cos(t), torch.sin(t)
        return torch.stack((torch.stack((c, s), -1), torch.stack((-s, c), -1)), -2)
    squarings = _squarings_for(gen)
    x = gen.reshape(-1, size, size)
    _warn_if_inaccurate(math.ldexp(1.0, squarings), gen.dtype)
    return _taylor_expm_squared(x * (2.0**-squarings), squarings).reshape(gen.shape)


# Note [series as a polynomial in the positions]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# LieRE's generator is linear in the position, X(p) = sum_a p_a B_a, so the truncated series
# T(X(p)) = sum_{k<=m} X(p)^k / k! is a polynomial of degree m in p whose matrix coefficients
# depend on the bases only: T(X(p)) = sum_{|e|<=m} p^e C_e / |e|!, where C_e is the sum of all
# products of |e| bases with e_a copies of B_a. The C_e follow from C_e = sum_a B_a C_{e-1_a},
# one bmm per degree for every head and block at once (O(m^2) products per block, not per
# token); the series for every token is then a single GEMM of monomials (tokens x T) with
# coefficients (T x blocks*s*s) (``_SeriesProduct``: its buffers come from the buffer pool,
# Note [buffer pool] in ``liere.kernels``). Per-token products are left for the squarings only, and
# since the degree no longer costs per-token products it is raised (theta 2.1 instead of 1.3),
# which saves a squaring. Used for one or two axes (T = m+1 or (m+1)(m+2)/2 = 15 or 120 in
# float32); with three axes T = 680 and Paterson-Stockmeyer per token is cheaper.
# Float32's degree 14 is a trade: degree 16 (theta 2.69) saves a third of a squaring per token
# but costs 27% more coefficients and GEMM, and measured about 8 ms slower per dense ViT-S layer
# at batch 8 (5% of it) with products along rays; degree 12 was 3 ms faster still. Accuracy on
# the paper's 14x14 grid, max |R - exp| against float64 (dense 64x64 / 8x8 blocks): degree 16
# 6.4e-6 / 4.0e-6, degree 14 7.1e-6 / 5.5e-6, degree 12 9.5e-6 / 5.5e-6; float32
# torch.linalg.matrix_exp 1.5e-5 / 5.0e-6.
#
# Note [coefficient range]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# ||C_e|| can reach binom(|e|, e_0) * prod_a ||B_a||^(e_a): with dense 64x64 blocks at the
# paper's init (||B_a|| about 130) degree-16 coefficients in float32 reached 3e36, a factor
# 100 from overflow, and generators twice as large gave inf and NaN. The bases are therefore
# scaled by 2^-e to a norm below 1 (e from the largest ||B_a||) and the positions by 2^e, which
# leaves every generator p_a B_a as it was, bit for bit (powers of two), and bounds ||C_e|| by
# binom(degree, degree / 2) (3,432 at degree 14).
# (degree, theta): theta^(degree+1)/(degree+1)! below the unit roundoff
_POLY = {torch.float32: (14, 2.11), torch.float64: (24, 2.30)}
_POLY_MAX_AXES = 2


def _uses_polynomial(dtype: torch.dtype, num_axes: int) -> bool:
    return dtype in _POLY and num_axes <= _POLY_MAX_AXES


def _poly_coefficients(bases: Tensor, degree: int) -> Tensor:
    """Coefficients ``C_e`` (Note [series as a polynomial in the positions]), side by side.

    Monomials are ordered by degree ``k``, then by the power ``i`` of the first axis
    (``p_0^i p_1^(k-i)`` for two axes). One bmm per degree forward, two backward
    (``_PolyCoefficients``).

    Shape:
        bases ``(h, a, m, s, s)``, a <= 2 -> ``(h*m, s, T*s)``
    """
    out: Tensor = _PolyCoefficients.apply(_stack_axes(bases), degree)
    return out


def _stack_axes(bases: Tensor) -> Tensor:
    """``[B_0; B_1]`` stacked by rows for every (head, block): ``(h, a, m, s, s)`` ->
    ``(h*m, a*s, s)``, so one bmm multiplies every axis with every coefficient block."""
    h, a, m, s, _ = bases.shape
    return bases.transpose(0, 1).reshape(a, h * m, s, s).transpose(0, 1).reshape(h * m, a * s, s)


def _level_offsets(degree: int, a: int) -> list[int]:
    """Column-block offset of each degree's coefficients (``k + 1`` blocks per degree for
    two axes, one for one axis); the last entry is ``T``."""
    offsets = [0]
    for k in range(degree + 1):
        offsets.append(offsets[-1] + (k + 1 if a == 2 else 1))
    return offsets


def _poly_coefficients_plain(stacked: Tensor, degree: int) -> Tensor:
    """``_PolyCoefficients`` in plain autograd ops (the reference; double backward).

    Shape:
        stacked ``(h*m, a*s, s)`` (``_stack_axes``) -> ``(h*m, s, T*s)``
    """
    s = stacked.shape[-1]
    level = torch.eye(s, dtype=stacked.dtype, device=stacked.device).expand(stacked.shape[0], s, s)
    levels = [level]
    for _ in range(degree):
        prod = torch.bmm(stacked, level)  # (hm, a*s, D*s): row block a = B_a @ each C_e
        if stacked.shape[1] == s:
            level = prod
        else:  # C_(i, k-i) = B_0 C_(i-1, k-i) + B_1 C_(i, k-1-i)
            level = torch.nn.functional.pad(prod[:, :s], (s, 0)) + torch.nn.functional.pad(
                prod[:, s:], (0, s)
            )
        levels.append(level)
    return torch.cat(levels, dim=-1)


class _PolyCoefficients(torch.autograd.Function):
    """The coefficient recursion written into one buffer, with a hand-written backward: per
    degree ``G_prod = [G_k shifted; G_k]``, ``dS += G_prod @ C_(k-1)^T`` and
    ``G_(k-1) += S^T @ G_prod`` (autograd through pad/cat/slice costs about twice as much)."""

    @staticmethod
    def forward(ctx: Any, stacked: Tensor, degree: int) -> Tensor:
        hm, rows, s = stacked.shape
        a = rows // s
        offsets = _level_offsets(degree, a)
        out = _kernels._fresh(stacked, hm, s, offsets[-1] * s)
        out[:, :, :s].copy_(torch.eye(s, dtype=stacked.dtype, device=stacked.device))
        for k in range(1, degree + 1):
            prev = out[:, :, offsets[k - 1] * s : offsets[k] * s]
            level = out[:, :, offsets[k] * s : offsets[k + 1] * s]
            if a == 1:
                torch.bmm(stacked, prev, out=level)
                continue
            prod = torch.bmm(stacked, prev)  # (hm, 2s, k*s)
            level[:, :, : k * s].copy_(prod[:, s:])
            level[:, :, k * s :].zero_()
            level[:, :, s:].add_(prod[:, :s])
        ctx.save_for_backward(stacked, out)
        ctx.degree = degree
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None]:
        stacked, out = ctx.saved_tensors
        degree = ctx.degree
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            with torch.enable_grad():
                ref = _poly_coefficients_plain(stacked, degree)
                (d,) = torch.autograd.grad(ref, stacked, grad, create_graph=True)
            return d, None
        hm, rows, s = stacked.shape
        a = rows // s
        offsets = _level_offsets(degree, a)
        d_stacked = torch.zeros_like(stacked)
        st = stacked.mT
        carry: Optional[Tensor] = None  # gradient reaching degree k from degree k + 1
        for k in range(degree, 0, -1):
            g = grad[:, :, offsets[k] * s : offsets[k + 1] * s]
            if carry is not None:
                g = g + carry
            prev = out[:, :, offsets[k - 1] * s : offsets[k] * s]
            # one cat of the level's gradient, then one product each way: splitting it into
            # two products per half writes into strided halves of dS, which ATen runs as a
            # loop over matrices (3x slower for 8x8 blocks, measured)
            g_prod = g if a == 1 else torch.cat((g[:, :, s:], g[:, :, : k * s]), dim=1)
            d_stacked.baddbmm_(g_prod, prev.mT)
            if k > 1:
                carry = torch.bmm(st, g_prod)
        return d_stacked, None


def _series_product_plain(coefficients: Tensor, weights: Tensor, entry_major: bool) -> Tensor:
    """The series of every token from the coefficients (``_SeriesProduct`` in plain ops).

    Shape:
        coefficients ``(hm, s, T*s)``, weights ``(N, T)`` -> entry-major ``(s, s, hm, N)`` or
        batch-major ``(N, hm, s, s)``
    """
    hm, s, ts = coefficients.shape
    terms, count = ts // s, weights.shape[0]
    blocks = coefficients.view(hm, s, terms, s)
    if entry_major:  # (s*s*hm, T) @ (T, N)
        flat = blocks.permute(1, 3, 0, 2).reshape(-1, terms)
        return torch.matmul(flat, weights.mT).view(s, s, hm, count)
    flat = blocks.permute(2, 0, 1, 3).reshape(terms, -1)  # (N, T) @ (T, hm*s*s)
    return torch.matmul(weights, flat).view(count, hm, s, s)


class _SeriesProduct(torch.autograd.Function):
    """``_series_product_plain`` with every large buffer (the coefficients laid out for the
    GEMM, the series, and their gradients) from the buffer pool (Note [buffer pool] in
    ``liere.kernels``): one permuted copy and one GEMM each way. Saves the coefficients (which
    ``_PolyCoefficients`` keeps anyway), the weights, and the permuted copy only when the
    weights need a gradient."""

    @staticmethod
    def forward(ctx: Any, coefficients: Tensor, weights: Tensor, entry_major: bool) -> Tensor:
        hm, s, ts = coefficients.shape
        terms, count = ts // s, weights.shape[0]
        blocks = coefficients.view(hm, s, terms, s)
        fresh = _kernels._fresh
        if entry_major:  # (s*s*hm, T) @ (T, N) -> (s, s, hm, N)
            flat = fresh(coefficients, s, s, hm, terms)
            flat.copy_(blocks.permute(1, 3, 0, 2))
            out = fresh(coefficients, s, s, hm, count)
            torch.mm(flat.view(-1, terms), weights.mT, out=out.view(-1, count))
        else:  # (N, T) @ (T, hm*s*s) -> (N, hm, s, s)
            flat = fresh(coefficients, terms, hm, s, s)
            flat.copy_(blocks.permute(2, 0, 1, 3))
            out = fresh(coefficients, count, hm, s, s)
            torch.mm(weights, flat.view(terms, -1), out=out.view(count, -1))
        ctx.entry_major = entry_major
        ctx.save_for_backward(coefficients, weights, flat if ctx.needs_input_grad[1] else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        coefficients, weights, flat = ctx.saved_tensors
        entry_major = ctx.entry_major
        need_coef, need_weights = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: recompute in differentiable plain ops
            inputs = [t for t, need in ((coefficients, need_coef), (weights, need_weights)) if need]
            with torch.enable_grad():
                ref = _series_product_plain(coefficients, weights, entry_major)
                grads = iter(torch.autograd.grad(ref, inputs, grad, create_graph=True))
            return (
                (next(grads) if need_coef else None),
                (next(grads) if need_weights else None),
                None,
            )
        hm, s, ts = coefficients.shape
        terms, count = ts // s, weights.shape[0]
        g = grad.contiguous()
        d_coef = d_weights = None
        if need_coef:
            fresh = _kernels._fresh
            if entry_major:  # d_flat (s*s*hm, T) = g (s*s*hm, N) @ W (N, T)
                d_flat = fresh(grad, s, s, hm, terms)
                torch.mm(g.view(-1, count), weights, out=d_flat.view(-1, terms))
                d_blocks = d_flat.permute(2, 0, 3, 1)  # (hm, s, T, s)
            else:  # d_flat (T, hm*s*s) = W^T (T, N) @ g (N, hm*s*s)
                d_flat = fresh(grad, terms, hm, s, s)
                torch.mm(weights.mT, g.view(count, -1), out=d_flat.view(terms, -1))
                d_blocks = d_flat.permute(1, 2, 0, 3)  # (hm, s, T, s)
            d_coef = fresh(grad, hm, s, ts)
            d_coef.view(hm, s, terms, s).copy_(d_blocks)
        if need_weights:  # positions that need gradients
            if entry_major:  # d_W (N, T) = g^T (N, s*s*hm) @ flat (s*s*hm, T)
                d_weights = g.view(-1, count).mT @ flat.view(-1, terms)
            else:  # d_W (N, T) = g (N, hm*s*s) @ flat^T (hm*s*s, T)
                d_weights = g.view(count, -1) @ flat.view(terms, -1).mT
        return d_coef, d_weights, None


def _poly_weights(positions: Tensor, degree: int) -> Tensor:
    """Monomials ``p^e / |e|!`` in the order of ``_poly_coefficients`` (powers by a cumulative
    product, so gradients stay finite at p = 0; a handful of ops whatever the degree).

    Shape:
        positions ``(N, a)``, a <= 2 -> ``(N, T)``
    """
    n, a = positions.shape
    ones = positions.new_ones(n, a, 1)
    powers = torch.cat((ones, positions.unsqueeze(-1).expand(n, a, degree)), dim=-1).cumprod(-1)
    first, second, scale = _monomial_table(degree, a, positions.device, positions.dtype)
    if a == 1:
        return powers[:, 0] * scale
    return powers[:, 0, first] * powers[:, 1, second] * scale


def _monomial_table(
    degree: int, axes: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Powers of each axis and ``1/|e|!`` for every monomial, in ``_poly_coefficients`` order
    (degree ``k``, then the power ``i`` of the first axis: ``p_0^i p_1^(k-i)``)."""
    if axes == 1:
        exps = [(k, 0, k) for k in range(degree + 1)]
    else:
        exps = [(i, k - i, k) for k in range(degree + 1) for i in range(k + 1)]
    first = torch.tensor([e[0] for e in exps], device=device)
    second = torch.tensor([e[1] for e in exps], device=device)
    scale = torch.tensor([1.0 / math.factorial(e[2]) for e in exps], device=device, dtype=dtype)
    return first, second, scale


# Note [per-token squarings]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The squaring count only has to bring each token's own generator into the series' range:
# token n gets j_n = ceil(log2(bound_n / theta)) with bound_n = max over heads and blocks of
# sum_a |p_a| ||B_a||_2, its positions (hence its series) are scaled by 2^-j_n, and tokens
# are sorted by j_n (descending) so that the l-th squaring is a product over the prefix of
# tokens with j_n >= l. On a 14x14 grid with the paper's init (LieRE_8, 6 heads, seed 0,
# float32 degree 14) this is 689 token-squarings instead of 196 * 5 = 980, before products
# along rays take 78 tokens out. The rotations are put back in the callers' token order after
# they are laid out as (h, n, m, s, s), where each token's blocks are one contiguous row.


def _spectral_norms(blocks: Tensor) -> Tensor:
    """``||B||_2`` of a batch of square blocks: the largest eigenvalue of ``B^T B`` (half the
    cost of an SVD here).

    Shape:
        ``(..., s, s)`` -> ``(...)``
    """
    return torch.linalg.eigvalsh(blocks.mT @ blocks)[..., -1].clamp_min(0).sqrt()


def _token_squarings(bound: Tensor, theta: float) -> Tensor:
    """Squarings ``j_n = ceil(log2(bound_n / theta))`` (0 when ``bound_n <= theta``) per token
    (Note [per-token squarings]).

    Shape:
        bound ``(N,)`` -> ``(N,)`` int64
    """
    b = bound.double()
    return torch.where(b > theta, torch.ceil(torch.log2(b / theta)), torch.zeros_like(b)).long()


def _squaring_levels(js: Tensor) -> tuple[tuple[int, ...], Optional[Tensor]]:
    """``counts`` (tokens squared at least ``l`` times, ``l = 1..max j``) and the order that
    sorts tokens by ``j`` descending (``None`` when every token has the same ``j``), for
    ``_Squarings``."""
    top = int(js.max()) if js.numel() else 0
    if top == 0:
        return (), None
    at_least = torch.bincount(js, minlength=top + 1).flip(0).cumsum(0).flip(0)
    counts = tuple(int(c) for c in at_least[1:].tolist())
    if counts[-1] == js.numel():
        return counts, None
    return counts, torch.argsort(js, descending=True, stable=True)


class _KernelSquarings(torch.autograd.Function):
    """``R[h, n, m] = T[h, m, n]^(2^j_n)`` by the compiled kernel (Note [compiled kernels] in
    ``liere.kernels``): no sorting, nothing saved but ``T`` and ``j``. ``layout`` is the
    series' layout (``_kernels.LAYOUTS``)."""

    @staticmethod
    def forward(ctx: Any, series: Tensor, js: Tensor, h: int, m: int, layout: str) -> Tensor:
        ctx.save_for_backward(series, js)
        ctx.layout = (h, m, layout)
        return _kernels.squarings_forward(series, js, h, m, layout)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None, None]:
        series, js = ctx.saved_tensors
        h, m, layout = ctx.layout
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            with torch.enable_grad():
                out = _token_squarings_plain(series, js, h, m, layout)
                (d_series,) = torch.autograd.grad(out, series, grad, create_graph=True)
            return d_series, None, None, None, None
        d_series = _kernels.squarings_backward(series, js, grad.contiguous(), h, m, layout)
        return d_series, None, None, None, None


def _token_squarings_plain(series: Tensor, js: Tensor, h: int, m: int, layout: str) -> Tensor:
    """``_KernelSquarings`` in plain autograd ops (the reference; double backward).

    Shape:
        series in ``layout`` (``_kernels.LAYOUTS``); js ``(N,)`` -> ``(h, N, m, s, s)``
    """
    count, size = js.shape[0], _kernels.block_size_of(series, layout)
    if layout == "entry":
        out = series.view(size, size, h * m, count).permute(3, 2, 0, 1)
    elif layout == "batch":
        out = series.view(count, h * m, size, size)
    else:  # entry-hnm
        out = series.view(size, size, h, count, m).permute(3, 2, 4, 0, 1)
        out = out.reshape(count, h * m, size, size)
    for level in range(1, (int(js.max()) if js.numel() else 0) + 1):
        out = torch.where((js >= level).view(-1, 1, 1, 1), torch.matmul(out, out), out)
    return out.reshape(count, h, m, size, size).transpose(0, 1)


class _TakeTokens(torch.autograd.Function):
    """``x.index_select(1, index)`` for a permutation ``index`` of dim 1 (its inverse given):
    the backward is a gather too, not index_select's zero fill and scatter-add."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None  # differentiable: double backward


# Note [products along rays]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# Generators are linear in the position, so the generators of two positions on one ray from the
# origin commute, and R(p + q) = R(p) R(q) when q = c p with c >= 0: along a ray the rotations
# form a one-parameter group. Grid positions (grid_positions: index / (reference - 1) on each
# axis) lie on a lattice p = delta * z with integer z; a token with z = g u (u primitive, g the
# gcd of z's entries, g >= 2) then has
#   R(z) = R(ceil(g/2) u) R(floor(g/2) u),
# one s x s product forward and two backward, in place of its share of the series and j
# squarings (three products each in training). Both factors must be tokens too, computed
# directly or split in turn; the splits form levels (ceil(log2 g) deep), each one batched
# product over its tokens (_RayProducts). On the 14x14 grid 78 of the 196 tokens are split.
# Accuracy: a split is the top squaring of scaling and squaring (R(2x) = R(x)^2) with its
# halves' errors added, so a token is split only when the direct path would square it at least
# once (bound_n > theta); nearer the origin, where a chain of products would start from a tiny
# generator and pile up rounding the series does not have, tokens are computed directly.
# A position is taken as on the lattice when it is within 8 ulps of delta * z (the rotation then
# differs by what rounding the position itself already does; the lattice spacing delta is the
# smallest non-zero |p_a| of each axis). Everything else is computed directly: off-lattice
# tokens, repeated positions, tokens whose halves are not tokens (e.g. a grid centred on 0),
# positions that need a gradient (the split is exact in the bases, not in the positions),
# per-sample positions and non-CPU tensors (the plan is built on the host, once per distinct
# set of positions and squaring counts, and kept in a small cache).

_RAY_PLAN_CACHE: dict[tuple[Any, ...], Optional[_RayPlan]] = {}
_RAY_PLAN_CACHE_SIZE = 32  # chunked rotations (max_tokens_per_chunk) need one per chunk
_RAY_MAX_INDEX = 2**20
_RAY_PLAN_LOCK = threading.Lock()


class _RayPlan:
    """Which tokens are products of two others (Note [products along rays]).

    ``base``: tokens computed directly, in the order the direct rotations come in; ``levels``:
    per level, ``(dst, left, right)`` token indices with ``R[dst] = R[left] @ R[right]``; every
    ``left``/``right`` is in ``base`` or an earlier level."""

    def __init__(self, n: int, base: list[int], levels: list[tuple[list[int], ...]]) -> None:
        self.n = n
        self.base = torch.tensor(base, dtype=torch.long)
        self.levels = [tuple(torch.tensor(ix, dtype=torch.long) for ix in lv) for lv in levels]
        self.split = n - len(base)
        # every level's items one after the other, for the compiled kernel
        self.items = tuple(torch.cat([lv[k] for lv in self.levels]) for k in range(3))


def _ray_plan(positions: Tensor, js: Tensor) -> Optional[_RayPlan]:
    """The split of ``positions`` into directly computed tokens and products along rays, or
    ``None`` when no token is split (Note [products along rays]). ``js``: the direct path's
    squaring count per token; only tokens with ``j >= 1`` are split.

    Shape:
        positions ``(n, a)`` (CPU); js ``(n,)``
    """
    key = (
        positions.dtype,
        tuple(positions.shape),
        tuple(positions.flatten().tolist()),
        tuple(js.tolist()),
    )
    with _RAY_PLAN_LOCK:
        if key in _RAY_PLAN_CACHE:
            return _RAY_PLAN_CACHE[key]
    plan = _build_ray_plan(positions, js)
    with _RAY_PLAN_LOCK:  # forward passes may run in several threads
        while len(_RAY_PLAN_CACHE) >= _RAY_PLAN_CACHE_SIZE:
            _RAY_PLAN_CACHE.pop(next(iter(_RAY_PLAN_CACHE)))
        _RAY_PLAN_CACHE[key] = plan
    return plan


def _build_ray_plan(positions: Tensor, js: Tensor) -> Optional[_RayPlan]:
    n = positions.shape[0]
    pos = positions.to(torch.float64)
    mag = pos.abs()
    spacing = torch.where(mag > 0, mag, torch.full_like(mag, math.inf)).amin(dim=0)
    spacing = torch.where(torch.isfinite(spacing), spacing, torch.ones_like(spacing))
    z = pos / spacing
    zr = torch.round(z)
    ulps = 8 * torch.finfo(positions.dtype).eps
    on_lattice = ((z - zr).abs() <= ulps * zr.abs().clamp_min(1)).all(-1)
    on_lattice &= (zr.abs() <= _RAY_MAX_INDEX).all(-1)
    zi = torch.where(on_lattice.unsqueeze(-1), zr, torch.zeros_like(zr)).long()
    g = zi[:, 0].abs()
    for axis in range(1, zi.shape[1]):
        g = torch.gcd(g, zi[:, axis])
    candidates = (on_lattice & (g >= 2) & (js >= 1)).nonzero().flatten()
    if candidates.numel() == 0:
        return None
    index: dict[tuple[int, ...], int] = {}
    for t, row in zip(on_lattice.nonzero().flatten().tolist(), zi[on_lattice].tolist()):
        index.setdefault(tuple(row), t)
    level: dict[int, tuple[int, int, int]] = {}  # token -> (level, left, right)
    order = candidates[torch.argsort(g[candidates], stable=True)].tolist()  # halves first
    for t, row, gt in zip(order, zi[order].tolist(), g[order].tolist()):
        if index[tuple(row)] != t:
            continue  # a repeated position: computed directly
        unit = [c // gt for c in row]
        left = index.get(tuple(c * ((gt + 1) // 2) for c in unit))
        right = index.get(tuple(c * (gt // 2) for c in unit))
        if left is None or right is None:
            continue
        depth = 1 + max(level.get(left, (0,))[0], level.get(right, (0,))[0])
        level[t] = (depth, left, right)
    if not level:
        return None
    base = [t for t in range(n) if t not in level]
    levels: list[tuple[list[int], ...]] = []
    for depth in range(1, max(v[0] for v in level.values()) + 1):
        rows = [(t, lt, rt) for t, (d, lt, rt) in level.items() if d == depth]
        levels.append(tuple(list(col) for col in zip(*rows)))
    return _RayPlan(n, base, levels)


class _RayProducts(torch.autograd.Function):
    """Rotations of every token from those of the directly computed ones (Note [products
    along rays]): level by level ``R[dst] = R[left] @ R[right]``; backward
    ``dR[left] += dR[dst] R[right]^T``, ``dR[right] += R[left]^T dR[dst]``, levels reversed.
    Saves only its output (the rotations, which the application keeps anyway)."""

    @staticmethod
    def forward(ctx: Any, base: Tensor, plan: _RayPlan) -> Tensor:
        h, _, m, s, _ = base.shape
        out = _kernels._fresh(base, h, plan.n, m, s, s)
        out.index_copy_(1, plan.base, base)
        ctx.kernel = _kernels.usable(base, size=s, sizes=_kernels.RAY_SIZES)
        if ctx.kernel:
            _kernels.ray_products_forward(out, *plan.items)
        else:
            for dst, left, right in plan.levels:
                product = torch.matmul(out.index_select(1, left), out.index_select(1, right))
                out.index_copy_(1, dst, product)
        ctx.plan = plan
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        plan: _RayPlan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: out-of-place, differentiable
            g = grad
            for dst, left, right in reversed(plan.levels):
                g_dst = g.index_select(1, dst)
                g = g.index_add(1, left, g_dst @ out.index_select(1, right).mT)
                g = g.index_add(1, right, out.index_select(1, left).mT @ g_dst)
            return g.index_select(1, plan.base), None
        if ctx.kernel:
            d_base = _kernels.ray_products_backward(out, grad.contiguous(), plan.base, *plan.items)
            return d_base, None
        g = grad.contiguous().clone()
        for dst, left, right in reversed(plan.levels):
            g_dst = g.index_select(1, dst)
            g.index_add_(1, left, torch.matmul(g_dst, out.index_select(1, right).mT))
            g.index_add_(1, right, torch.matmul(out.index_select(1, left).mT, g_dst))
        return g.index_select(1, plan.base), None


class _KernelRotations(torch.autograd.Function):
    """``_KernelSquarings`` of the directly computed tokens, written straight into their rows,
    then ``_RayProducts``, both compiled (Note [products along rays]): the direct rotations
    are never copied in or out of the full tensor, forward or backward."""

    @staticmethod
    def forward(
        ctx: Any, series: Tensor, js: Tensor, h: int, m: int, layout: str, plan: _RayPlan
    ) -> Tensor:
        size = _kernels.block_size_of(series, layout)
        out = _kernels._fresh(series, h, plan.n, m, size, size)
        _kernels.squarings_forward(series, js, h, m, layout, out=out, rows=plan.base)
        _kernels.ray_products_forward(out, *plan.items)
        ctx.save_for_backward(series, js, out)
        ctx.args = (h, m, layout, plan)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None, None, None]:
        series, js, out = ctx.saved_tensors
        h, m, layout, plan = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            with torch.enable_grad():
                base = _token_squarings_plain(series, js, h, m, layout)
                ref = _ray_products_plain(base, plan)
                (d_series,) = torch.autograd.grad(ref, series, grad, create_graph=True)
            return d_series, None, None, None, None, None
        d_base = _kernels.ray_products_backward(out, grad.contiguous(), plan.base, *plan.items)
        d_series = _kernels.squarings_backward(series, js, d_base, h, m, layout)
        return d_series, None, None, None, None, None


def _ray_products_plain(base: Tensor, plan: _RayPlan) -> Tensor:
    """``_RayProducts`` in plain autograd ops (the reference).

    Shape:
        base ``(h, len(plan.base), m, s, s)`` -> ``(h, plan.n, m, s, s)``
    """
    h, _, m, s, _ = base.shape
    out = base.new_zeros(h, plan.n, m, s, s).index_copy(1, plan.base, base)
    for dst, left, right in plan.levels:
        product = out.index_select(1, left) @ out.index_select(1, right)
        out = out.index_copy(1, dst, product)
    return out


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
        sigma = _spectral_norms(bases.detach())  # (h, a, m)
        bound = torch.matmul(positions.detach().abs().unsqueeze(-3), sigma)  # (.., h, n, m)
        norm = float(bound.amax()) if bound.numel() else 0.0
    _warn_if_inaccurate(norm, bases.dtype)
    if positions.dim() == 2 and positions.device.type == "cpu" and not positions.requires_grad:
        # Note [products along rays]
        if _uses_polynomial(bases.dtype, bases.shape[1]):
            theta = _POLY[bases.dtype][1]
        else:
            theta = _TAYLOR[bases.dtype][2]
        js = _token_squarings(bound.amax(dim=(-3, -1)), theta)
        plan = _ray_plan(positions, js)
        if plan is not None:
            base = plan.base
            rotations, done = _direct_rotations(positions[base], bases, sigma, bound[:, base], plan)
            if done:
                return rotations, bound, norm
            split: Tensor = _RayProducts.apply(rotations, plan)
            return split, bound, norm
    return _direct_rotations(positions, bases, sigma, bound)[0], bound, norm


def _direct_rotations(
    positions: Tensor,
    bases: Tensor,
    sigma: Tensor,
    bound: Tensor,
    plan: Optional[_RayPlan] = None,
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
    entry_major = size <= _ENTRY_MAJOR_MAX_BLOCK
    batch = positions.shape[:-1]  # (n,) or (b, n)
    if _uses_polynomial(bases.dtype, a):
        squarings_for(norm, bases.dtype)  # raises on NaN/Inf
        flat_pos = positions.reshape(-1, a)
        count = flat_pos.shape[0]
        token_bound = bound.amax(dim=(-3, -1)).reshape(-1)
        # the same degree and squaring counts with or without the compiled kernels (Note
        # [series as a polynomial in the positions]): degree 8 with more squarings was a little
        # faster there but lost accuracy (each squaring doubles the rounding error: 1.8e-5
        # instead of 7.5e-6 off orthogonal on the paper's 14x14 grid)
        degree, theta = _POLY[bases.dtype]
        js = _token_squarings(token_bound, theta)
        kernel = (
            _kernels.usable(bases, positions, size=size)
            and (int(js.max()) if js.numel() else 0) <= _kernels.MAX_SQUARINGS
        )
        counts, order = ((), None) if kernel else _squaring_levels(js)
        if order is not None:
            flat_pos, js = flat_pos[order], js[order]
        # Note [coefficient range]: bases scaled by 2^-e to norm < 1, positions by 2^e (exact)
        e = math.frexp(float(sigma.amax()))[1] if sigma.numel() else 0
        scale = torch.exp2(e - js.to(flat_pos.dtype)).unsqueeze(-1)
        weights = _poly_weights(flat_pos * scale, degree)  # (N, T)
        coefficients = _poly_coefficients(bases * 2.0**-e if e else bases, degree)  # (hm, s, T*s)
        series: Tensor = _SeriesProduct.apply(coefficients, weights, entry_major)
        if kernel:
            layout = "entry" if entry_major else "batch"
            if plan is not None and _kernels.usable(bases, size=size, sizes=_kernels.RAY_SIZES):
                full: Tensor = _KernelRotations.apply(
                    series, js.to(torch.int32), h, m, layout, plan
                )  # (h, plan.n, m, s, s)
                return full, True
            rot: Tensor = _KernelSquarings.apply(
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
            kernel_rot: Tensor = _KernelSquarings.apply(taylor, js, h, m, "entry-hnm")
            return kernel_rot, False
    out = _exp_by_squaring(gen.reshape(size, size, -1), squarings, True)
    shape = gen.shape[2:]
    out = out.view(size, size, *shape).permute(*range(2, 2 + len(shape)), 0, 1)
    return out.contiguous(), False


def is_tracing() -> bool:
    """True while torch.compile, torch.export, TorchScript tracing or ONNX export traces the
    code: data-dependent choices (the squaring count, caches, input checks) are skipped then."""
    for check in _TRACING_CHECKS:
        if check():
            return True
    return False


def _tracing_checks() -> tuple[Any, ...]:
    """The tracing predicates this torch has (looked up once: they are functions)."""
    checks = []
    for owner, name in (
        ("compiler", "is_compiling"),
        ("compiler", "is_exporting"),
        ("jit", "is_tracing"),
        ("onnx", "is_in_onnx_export"),
    ):
        check = getattr(getattr(torch, owner, None), name, None)
        if callable(check):
            checks.append(check)
    return tuple(checks)


_TRACING_CHECKS = _tracing_checks()


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
    if fast and not is_tracing():
        if q.shape[1] % rotations.shape[0] == 0 and q.shape[2] - p == rotations.shape[1]:
            out: tuple[Tensor, Tensor] = _BlockwisePair.apply(q, k, rotations, p)
            return out
    return _blockwise_pair_plain(q, k, rotations, p)


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


def _blockwise_pair_plain(q: Tensor, k: Tensor, rotations: Tensor, p: int) -> tuple[Tensor, Tensor]:
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
                outs = _blockwise_pair_plain(q, k, rotations, p)
                grads = iter(torch.autograd.grad(outs, inputs, (grad_q, grad_k), create_graph=True))
            d_q, d_k, d_r = (next(grads) if t.requires_grad else None for t in (q, k, rotations))
            return d_q, d_k, d_r, None
        if ctx.kernel:
            need_qk = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            d_q, d_k, d_r = _kernels.apply_backward(
                q, k, rotations, grad_q, grad_k, p, need_qk, ctx.needs_input_grad[2]
            )
            return d_q, d_k, d_r, None
        hr, n, m, s, _ = rotations.shape
        shape = torch.Size((hr, n, m, 2, grad_q.shape[0], grad_q.shape[1] // hr, s))
        g = grad_q.new_empty(shape)
        _gather_blocks(grad_q, g[:, :, :, 0], p)
        _gather_blocks(grad_k, g[:, :, :, 1], p)
        count = shape[0] * shape[1] * shape[2]
        g_flat = g.view(count, -1, s)
        d_rot = None
        if x is not None:
            d_rot = torch.bmm(x.view(count, -1, s).mT, g_flat).mT.reshape(shape[:3] + (s, s))
        d_q = d_k = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d_x = torch.bmm(g_flat, rotations.reshape(count, s, s).contiguous()).view(shape)
            d_q = _scatter_blocks(d_x[:, :, :, 0], grad_q, p)
            d_k = _scatter_blocks(d_x[:, :, :, 1], grad_k, p)
        return d_q, d_k, d_rot, None

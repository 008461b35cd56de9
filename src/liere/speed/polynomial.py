"""The Taylor series of exp(sum_a p_a B_a) as one GEMM of position monomials against per-block
coefficients (one or two axes).

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from liere import kernels as _kernels

# Note [series as a polynomial in the positions]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# LieRE's generator is linear in the position, X(p) = sum_a p_a B_a, so the truncated series
# T(X(p)) = sum_{k<=m} X(p)^k / k! is a polynomial of degree m in p whose matrix coefficients
# depend on the bases only: T(X(p)) = sum_{|e|<=m} p^e C_e / |e|!, where C_e is the sum of all
# products of |e| bases with e_a copies of B_a. The C_e follow from C_e = sum_a B_a C_{e-1_a},
# one bmm per degree for every head and block at once (O(m^2) products per block, not per
# token); the series for every token is then a single GEMM of monomials (tokens x T) with
# coefficients (T x blocks*s*s) (``PolySeries``; for blocks up to 8x8 the coefficient kernel
# writes them in the GEMM's layout directly). Per-token products are left for the squarings
# only, and since the degree no longer costs per-token products it is raised (theta 2.1
# instead of 1.3), which saves a squaring. Used for one or two axes (T = m+1 or
# (m+1)(m+2)/2 = 15 or 120 in float32); with three axes T = 680 and Paterson-Stockmeyer per
# token is cheaper.
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
POLY = {torch.float32: (14, 2.11), torch.float64: (24, 2.30)}
_POLY_MAX_AXES = 2


def uses_polynomial(dtype: torch.dtype, num_axes: int) -> bool:
    return dtype in POLY and num_axes <= _POLY_MAX_AXES


# Note [series in rows]
# ~~~~~~~~~~~~~~~~~~~~~
# The coefficients come out of the recursion as (hm, s, T*s): row i of block hm holds the
# (T, s) rows of every C_e. For blocks the coefficient kernel does not serve, the series of
# every token is therefore written in "rows" layout, (hm, s, N, s): row i of block hm of every
# token is W (N, T) @ coefficients[hm, i] (T, s), one batched product over the hm*s rows that
# reads the coefficients in place, and its gradient W^T @ g[hm, i] writes the coefficients'
# layout directly. The squarings kernels read and write that layout (a row stride per
# matrix). It replaced a permuted copy of the coefficients (11.8 MB for dense ViT-S/16 heads)
# and one GEMM into (N, hm, s, s): about 10 -> 6 ms for 6 dense 64x64 heads, 118 tokens and
# 120 monomials, the same bits (docs/performance.md). Without the kernels the series stays
# batch-major, (N, hm, s, s), which the squarings in torch ops group by token.
SERIES_LAYOUTS = ("entry", "batch", "rows")


def series_shape(hm: int, s: int, count: int, layout: str) -> tuple[int, int, int, int]:
    """The shape of ``poly_series``' output in ``layout``: ``"entry"`` ``(s, s, hm, N)``,
    ``"batch"`` ``(N, hm, s, s)`` or ``"rows"`` ``(hm, s, N, s)``."""
    if layout == "entry":
        return (s, s, hm, count)
    if layout == "batch":
        return (count, hm, s, s)
    if layout == "rows":
        return (hm, s, count, s)
    raise ValueError(f"unknown series layout {layout!r}; expected one of {SERIES_LAYOUTS}")


def poly_terms(degree: int, num_axes: int) -> int:
    """How many monomials of degree <= ``degree`` in one or two axes (``T``)."""
    return degree + 1 if num_axes == 1 else (degree + 1) * (degree + 2) // 2


def poly_coefficients(bases: Tensor, degree: int) -> Tensor:
    """Coefficients ``C_e`` (Note [series as a polynomial in the positions]), side by side.

    Monomials are ordered by degree ``k``, then by the power ``i`` of the first axis
    (``p_0^i p_1^(k-i)`` for two axes). One bmm per degree forward, two backward
    (``PolyCoefficients``).

    Shape:
        bases ``(h, a, m, s, s)``, a <= 2 -> ``(h*m, s, T*s)``
    """
    out: Tensor = PolyCoefficients.apply(stack_axes(bases), degree)
    return out


def stack_axes(bases: Tensor) -> Tensor:
    """``[B_0; B_1]`` stacked by rows for every (head, block): ``(h, a, m, s, s)`` ->
    ``(h*m, a*s, s)``, so one bmm multiplies every axis with every coefficient block."""
    h, a, m, s, _ = bases.shape
    return bases.transpose(0, 1).reshape(a, h * m, s, s).transpose(0, 1).reshape(h * m, a * s, s)


def poly_coefficients_plain(stacked: Tensor, degree: int) -> Tensor:
    """``PolyCoefficients`` in plain autograd ops (the reference; double backward).

    Shape:
        stacked ``(h*m, a*s, s)`` (``stack_axes``) -> ``(h*m, s, T*s)``
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


class PolyCoefficients(torch.autograd.Function):
    """The coefficient recursion written into one buffer, with a hand-written backward: per
    degree ``G_prod = [G_k shifted; G_k]``, ``dS += G_prod @ C_(k-1)^T`` and
    ``G_(k-1) += S^T @ G_prod`` (autograd through pad/cat/slice costs about twice as much).
    Blocks up to 8x8 run both ways in the compiled kernel (``liere.kernels``): one parallel
    region each instead of some thirty batched products, copies and concatenations."""

    @staticmethod
    def forward(ctx: Any, stacked: Tensor, degree: int) -> Tensor:
        out = _poly_coefficients_forward(stacked, degree)
        ctx.save_for_backward(stacked, out)
        ctx.degree = degree
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None]:
        stacked, out = ctx.saved_tensors
        degree = ctx.degree
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            with torch.enable_grad():
                ref = poly_coefficients_plain(stacked, degree)
                (d,) = torch.autograd.grad(ref, stacked, grad, create_graph=True)
            return d, None
        return _poly_coefficients_backward(grad, stacked, out, degree), None


def _poly_coefficients_forward(stacked: Tensor, degree: int) -> Tensor:
    """``PolyCoefficients``' forward: the compiled kernel where it serves, else the recursion
    in batched products."""
    hm, rows, s = stacked.shape
    if _kernels.usable(stacked, size=s, sizes=_kernels.POLY_SIZES):
        return _kernels.poly_coefficients_forward(stacked.contiguous(), degree)[0]
    a = rows // s
    offsets = _kernels.poly_offsets(degree, a)
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
    return out


def _poly_coefficients_backward(grad: Tensor, stacked: Tensor, out: Tensor, degree: int) -> Tensor:
    """``PolyCoefficients``' vector-Jacobian product (first order, no autograd): the
    gradient with respect to the stacked bases, from the coefficients ``out`` it produced."""
    hm, rows, s = stacked.shape
    if _kernels.usable(stacked, out, grad, size=s, sizes=_kernels.POLY_SIZES):
        return _kernels.poly_coefficients_backward(
            grad.contiguous(), stacked.contiguous(), out.contiguous(), degree
        )
    a = rows // s
    offsets = _kernels.poly_offsets(degree, a)
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
    return d_stacked


def series_product_plain(coefficients: Tensor, weights: Tensor, layout: str) -> Tensor:
    """The series of every token from the coefficients (the GEMM of ``poly_series`` in plain ops).

    Shape:
        coefficients ``(hm, s, T*s)``, weights ``(N, T)`` -> ``series_shape(hm, s, N, layout)``
    """
    hm, s, ts = coefficients.shape
    terms, count = ts // s, weights.shape[0]
    if layout == "rows":  # (N, T) @ (hm*s, T, s) -> (hm*s, N, s)
        return torch.matmul(weights, coefficients.view(hm * s, terms, s)).view(hm, s, count, s)
    blocks = coefficients.view(hm, s, terms, s)
    if layout == "entry":  # (s*s*hm, T) @ (T, N)
        flat = blocks.permute(1, 3, 0, 2).reshape(-1, terms)
        return torch.matmul(flat, weights.mT).view(s, s, hm, count)
    flat = blocks.permute(2, 0, 1, 3).reshape(terms, -1)  # (N, T) @ (T, hm*s*s)
    return torch.matmul(weights, flat).view(count, hm, s, s)


def poly_series(stacked: Tensor, weights: Tensor, degree: int, layout: str) -> Tensor:
    """The series of every token (Note [series as a polynomial in the positions]): the
    coefficients of the stacked bases, then one GEMM with the monomials, as one autograd
    Function (``PolySeries``), so that the kernel can write the coefficients in the GEMM's
    layout directly.

    Shape:
        stacked ``(hm, a*s, s)`` (``stack_axes``); weights ``(N, T)`` ->
        ``series_shape(hm, s, N, layout)``
    """
    out: Tensor = PolySeries.apply(stacked, weights, degree, layout)
    return out


def poly_series_forward(
    stacked: Tensor,
    weights: Tensor,
    degree: int,
    layout: str,
    series_buffer: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``poly_series`` without autograd: the series, the coefficients ``(hm, s, T*s)`` (their
    backward reads them) and the GEMM's operand (the coefficients laid out as the GEMM reads
    them, which the positions' gradient needs; ``None`` in ``"rows"`` layout, whose product
    reads the coefficients themselves). With ``series_buffer`` (flat, contiguous, at least the
    series' size, its dtype and device) the series is written into its leading entries.

    With blocks the coefficient kernel serves and an entry-major series, the kernel writes
    both layouts in one pass; in ``"rows"`` layout the product reads the coefficients in place
    (Note [series in rows]); otherwise the GEMM's operand is a permuted copy (0.5 ms of
    1.4 MB at ViT-S/16 with 8x8 blocks, each way, measured: docs/performance.md).
    """
    hm, _, s = stacked.shape
    count = weights.shape[0]
    shape = series_shape(hm, s, count, layout)
    entry_major = layout == "entry"
    if layout == "rows":
        coefficients = _poly_coefficients_forward(stacked, degree)
        terms = coefficients.shape[-1] // s
        series = _series_output(coefficients, shape, series_buffer)
        rows = coefficients.view(hm * s, terms, s)
        torch.bmm(weights.expand(hm * s, count, terms), rows, out=series.view(hm * s, count, s))
        return series, coefficients, None
    if entry_major and _kernels.usable(stacked, size=s, sizes=_kernels.POLY_SIZES):
        coefficients, flat = _kernels.poly_coefficients_forward(
            stacked.contiguous(), degree, entry_major=True
        )
        assert flat is not None
        terms = flat.shape[-1]
    else:
        coefficients = _poly_coefficients_forward(stacked, degree)
        terms = coefficients.shape[-1] // s
        blocks = coefficients.view(hm, s, terms, s)
        if entry_major:
            flat = _kernels._fresh(coefficients, s, s, hm, terms)
            flat.copy_(blocks.permute(1, 3, 0, 2))
        else:
            flat = _kernels._fresh(coefficients, terms, hm, s, s)
            flat.copy_(blocks.permute(2, 0, 1, 3))
    series = _series_output(coefficients, shape, series_buffer)
    if entry_major:  # (s*s*hm, T) @ (T, N) -> (s, s, hm, N)
        torch.mm(flat.view(-1, terms), weights.mT, out=series.view(-1, count))
    else:  # (N, T) @ (T, hm*s*s) -> (N, hm, s, s)
        torch.mm(weights, flat.view(terms, -1), out=series.view(count, -1))
    return series, coefficients, flat


def _series_output(like: Tensor, shape: tuple[int, ...], buffer: Optional[Tensor]) -> Tensor:
    """Where the series goes: a fresh tensor of ``shape``, or the leading entries of
    ``buffer``."""
    if buffer is None:
        return _kernels._fresh(like, *shape)
    return buffer[: math.prod(shape)].view(shape)


def poly_series_backward(
    grad: Tensor,
    stacked: Tensor,
    coefficients: Tensor,
    weights: Tensor,
    degree: int,
    layout: str,
) -> Tensor:
    """``poly_series``' vector-Jacobian product with respect to the stacked bases, first
    order, no autograd: one GEMM, then the coefficients' backward, which reads the GEMM's
    gradient in place (entry-major, blocks the kernel serves; and "rows", whose product writes
    the coefficients' layout) or after a permuted copy.

    Shape:
        grad as the series; stacked ``(hm, a*s, s)``; coefficients ``(hm, s, T*s)``;
        weights ``(N, T)`` -> as stacked
    """
    hm, _, s = stacked.shape
    terms, count = weights.shape[1], weights.shape[0]
    g = grad.contiguous()
    if layout == "entry" and _kernels.usable(
        stacked, coefficients, g, size=s, sizes=_kernels.POLY_SIZES
    ):
        d_flat = _kernels._fresh(g, s, s, hm, terms)  # (s*s*hm, T) = g (s*s*hm, N) @ W (N, T)
        torch.mm(g.view(-1, count), weights, out=d_flat.view(-1, terms))
        return _kernels.poly_coefficients_backward(
            d_flat, stacked.contiguous(), coefficients, degree, entry_major=True
        )
    d_coef = _series_product_coefficients_grad(g, coefficients.shape, weights, layout)
    return _poly_coefficients_backward(d_coef, stacked, coefficients, degree)


class PolySeries(torch.autograd.Function):
    """``poly_series`` with hand-written backwards (``poly_series_backward``; the positions'
    gradient ``d_W = g^T @ flat``). Saves the stacked bases, the coefficients, the weights,
    and the GEMM's operand only when the weights need a gradient."""

    @staticmethod
    def forward(ctx: Any, stacked: Tensor, weights: Tensor, degree: int, layout: str) -> Tensor:
        series, coefficients, flat = poly_series_forward(stacked, weights, degree, layout)
        ctx.degree, ctx.layout = degree, layout
        keep_flat = flat if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(stacked, coefficients, weights, keep_flat)
        return series

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None, None]:
        stacked, coefficients, weights, flat = ctx.saved_tensors
        degree, layout = ctx.degree, ctx.layout
        need_bases, need_weights = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: recompute in differentiable plain ops
            inputs = [t for t, need in ((stacked, need_bases), (weights, need_weights)) if need]
            with torch.enable_grad():
                ref = series_product_plain(
                    poly_coefficients_plain(stacked, degree), weights, layout
                )
                grads = iter(torch.autograd.grad(ref, inputs, grad, create_graph=True))
            return (
                next(grads) if need_bases else None,
                next(grads) if need_weights else None,
                None,
                None,
            )
        d_stacked = d_weights = None
        if need_bases:
            d_stacked = poly_series_backward(grad, stacked, coefficients, weights, degree, layout)
        if need_weights:  # positions that need gradients
            g, count, terms = grad.contiguous(), weights.shape[0], weights.shape[1]
            if layout == "rows":  # d_W[n, t] = sum_(b, j) g[b, n, j] coefficients[b, t, j]
                s = stacked.shape[-1]
                d_weights = torch.einsum(
                    "bnj,btj->nt", g.view(-1, count, s), coefficients.view(-1, terms, s)
                )
            elif layout == "entry":  # d_W (N, T) = g^T (N, s*s*hm) @ flat (s*s*hm, T)
                d_weights = g.view(-1, count).mT @ flat.view(-1, terms)
            else:  # d_W (N, T) = g (N, hm*s*s) @ flat^T (hm*s*s, T)
                d_weights = g.view(count, -1) @ flat.view(terms, -1).mT
        return d_stacked, d_weights, None, None


def _series_product_coefficients_grad(
    grad: Tensor, shape: torch.Size, weights: Tensor, layout: str
) -> Tensor:
    """The series GEMM's gradient with respect to the coefficients (of ``shape``), first
    order, no autograd.

    Batch-major and "rows", row ``i`` of block ``hm`` of the coefficients, ``(T, s)``
    contiguous, is ``W^T (T, N) @ g[hm, i] (N, s)``: one batched product over ``hm * s`` rows
    reads the gradient in place (in "rows" layout contiguous, batch-major with row stride
    ``hm*s*s``) and writes the coefficients' layout directly.
    It replaced one GEMM into the series' layout and a permuted copy: 15.2 / 16.9 -> 5.6 /
    6.2 ms for dense 64x64 heads at ViT-S/16 (6 heads, 118 tokens, 120 monomials), and
    9.6 -> 6.5 ms with glibc's trimming off (docs/performance.md). Entry-major, one GEMM and
    one permuted copy.

    Shape:
        grad as the series (contiguous); weights ``(N, T)`` -> ``(hm, s, T*s)``
    """
    hm, s, ts = shape
    terms, count = ts // s, weights.shape[0]
    if layout != "entry":
        rows = (  # (hm*s, N, s)
            grad.view(hm * s, count, s)
            if layout == "rows"
            else grad.view(count, hm * s, s).transpose(0, 1)
        )
        return torch.bmm(weights.mT.expand(hm * s, terms, count), rows).view(hm, s, ts)
    fresh = _kernels._fresh
    d_flat = fresh(grad, s, s, hm, terms)  # (s*s*hm, T) = g (s*s*hm, N) @ W (N, T)
    torch.mm(grad.view(-1, count), weights, out=d_flat.view(-1, terms))
    d_coef = fresh(grad, hm, s, ts)
    d_coef.view(hm, s, terms, s).copy_(d_flat.permute(2, 0, 3, 1))  # (hm, s, T, s)
    return d_coef


def poly_weights(positions: Tensor, degree: int) -> Tensor:
    """Monomials ``p^e / |e|!`` in the order of ``poly_coefficients`` (powers by a cumulative
    product, so gradients stay finite at p = 0; a handful of ops whatever the degree): degree
    ``k``, then the power ``i`` of the first axis, ``p_0^i p_1^(k-i)``, which is the order of
    ``torch.tril_indices`` (row ``k``, column ``i``).

    Shape:
        positions ``(N, a)``, a <= 2 -> ``(N, T)``
    """
    n, a = positions.shape
    ones = positions.new_ones(n, a, 1)
    powers = torch.cat((ones, positions.unsqueeze(-1).expand(n, a, degree)), dim=-1).cumprod(-1)
    # 1/k! from float64 factorials (exact to degree 18, correctly rounded beyond; the same
    # float32 and float64 values as 1.0 / math.factorial(k) to degree 24, checked in tests)
    factorials = torch.arange(1, degree + 1, dtype=torch.float64, device=positions.device)
    inverse = torch.cat((factorials.new_ones(1), factorials.cumprod(0).reciprocal()))
    inverse = inverse.to(positions.dtype)
    if a == 1:
        return powers[:, 0] * inverse
    k, i = torch.tril_indices(degree + 1, degree + 1, device=positions.device)
    # one gather of both axes' powers from the flat (n, 2 * (degree + 1)) table
    picks = powers.reshape(n, -1).index_select(-1, torch.cat((i, k - i + degree + 1)))
    terms = i.numel()
    return picks[:, :terms] * picks[:, terms:] * inverse.index_select(0, k)

"""Products along rays: R(p + q) = R(p) R(q) when q is a positive multiple of p.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Optional

import torch
from torch import Tensor

from liere import kernels as _kernels

from .token_squarings import token_squarings_plain

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
# product over its tokens (RayProducts). On the 14x14 grid 78 of the 196 tokens are split.
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

RAY_PLAN_CACHE: dict[tuple[Any, ...], Optional[RayPlan]] = {}
RAY_PLAN_CACHE_SIZE = 32  # chunked rotations (max_tokens_per_chunk) need one per chunk
_RAY_MAX_INDEX = 2**20
_RAY_PLAN_LOCK = threading.Lock()


class RayPlan:
    """Which tokens are products of two others (Note [products along rays]).

    ``base``: tokens computed directly, in the order the direct rotations come in (most
    squarings first, token order within a count); ``levels``:
    per level, ``(dst, left, right)`` token indices with ``R[dst] = R[left] @ R[right]``; every
    ``left``/``right`` is in ``base`` or an earlier level."""

    def __init__(self, n: int, base: list[int], levels: list[tuple[list[int], ...]]) -> None:
        self.n = n
        self.base = torch.tensor(base, dtype=torch.long)
        self.levels = [tuple(torch.tensor(ix, dtype=torch.long) for ix in lv) for lv in levels]
        self.split = n - len(base)
        # every level's items one after the other, for the compiled kernel
        self.items = tuple(torch.cat([lv[k] for lv in self.levels]) for k in range(3))


def ray_plan(positions: Tensor, js: Tensor) -> Optional[RayPlan]:
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
        if key in RAY_PLAN_CACHE:
            return RAY_PLAN_CACHE[key]
    plan = build_ray_plan(positions, js)
    with _RAY_PLAN_LOCK:  # forward passes may run in several threads
        while len(RAY_PLAN_CACHE) >= RAY_PLAN_CACHE_SIZE:
            RAY_PLAN_CACHE.pop(next(iter(RAY_PLAN_CACHE)))
        RAY_PLAN_CACHE[key] = plan
    return plan


def build_ray_plan(positions: Tensor, js: Tensor) -> Optional[RayPlan]:
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
    # the directly computed tokens, most squarings first: the squarings kernel squares 16
    # tokens side by side as often as the most-squared of them needs, so sorted groups square
    # alike (on the 14x14 grid 464 lane-squarings for the 418 needed, against 560 in token
    # order)
    direct = [t for t in range(n) if t not in level]
    counts = js.tolist()
    base = sorted(direct, key=lambda t: -counts[t])  # stable: token order within a count
    levels: list[tuple[list[int], ...]] = []
    for depth in range(1, max(v[0] for v in level.values()) + 1):
        rows = [(t, lt, rt) for t, (d, lt, rt) in level.items() if d == depth]
        levels.append(tuple(list(col) for col in zip(*rows)))
    return RayPlan(n, base, levels)


class RayProducts(torch.autograd.Function):
    """Rotations of every token from those of the directly computed ones (Note [products
    along rays]): level by level ``R[dst] = R[left] @ R[right]``; backward
    ``dR[left] += dR[dst] R[right]^T``, ``dR[right] += R[left]^T dR[dst]``, levels reversed.
    Saves only its output (the rotations, which the application keeps anyway)."""

    @staticmethod
    def forward(ctx: Any, base: Tensor, plan: RayPlan) -> Tensor:
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
        plan: RayPlan = ctx.plan
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


class KernelRotations(torch.autograd.Function):
    """``KernelSquarings`` of the directly computed tokens, written straight into their rows,
    then ``RayProducts``, both compiled and in one parallel region each way
    (``kernels.rotations_forward`` / ``rotations_backward``; Note [products along rays]): the
    direct rotations are never copied in or out of the full tensor, forward or backward."""

    @staticmethod
    def forward(
        ctx: Any, series: Tensor, js: Tensor, h: int, m: int, layout: str, plan: RayPlan
    ) -> Tensor:
        size = _kernels.block_size_of(series, layout)
        out = _kernels._fresh(series, h, plan.n, m, size, size)
        _kernels.rotations_forward(series, js, h, m, layout, out, plan.base, *plan.items)
        ctx.save_for_backward(series, js, out)
        ctx.args = (h, m, layout, plan)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None, None, None]:
        series, js, out = ctx.saved_tensors
        h, m, layout, plan = ctx.args
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            with torch.enable_grad():
                base = token_squarings_plain(series, js, h, m, layout)
                ref = ray_products_plain(base, plan)
                (d_series,) = torch.autograd.grad(ref, series, grad, create_graph=True)
            return d_series, None, None, None, None, None
        dst, left, right = plan.items
        d_series = _kernels.rotations_backward(
            series, js, out, grad.contiguous(), plan.base, dst, left, right, h, m, layout
        )
        return d_series, None, None, None, None, None


def ray_products_plain(base: Tensor, plan: RayPlan) -> Tensor:
    """``RayProducts`` in plain autograd ops (the reference).

    Shape:
        base ``(h, len(plan.base), m, s, s)`` -> ``(h, plan.n, m, s, s)``
    """
    h, _, m, s, _ = base.shape
    out = base.new_zeros(h, plan.n, m, s, s).index_copy(1, plan.base, base)
    for dst, left, right in plan.levels:
        product = out.index_select(1, left) @ out.index_select(1, right)
        out = out.index_copy(1, dst, product)
    return out

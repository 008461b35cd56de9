"""Per-token squaring counts from the bases' spectral norms, and the squarings themselves.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from liere import kernels as _kernels

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


def spectral_norms(blocks: Tensor) -> Tensor:
    """``||B||_2`` of a batch of square blocks: the largest eigenvalue of ``B^T B`` (half the
    cost of an SVD here).

    Shape:
        ``(..., s, s)`` -> ``(...)``
    """
    return torch.linalg.eigvalsh(blocks.mT @ blocks)[..., -1].clamp_min(0).sqrt()


def token_squarings(bound: Tensor, theta: float) -> Tensor:
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


class KernelSquarings(torch.autograd.Function):
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
                out = token_squarings_plain(series, js, h, m, layout)
                (d_series,) = torch.autograd.grad(out, series, grad, create_graph=True)
            return d_series, None, None, None, None
        d_series = _kernels.squarings_backward(series, js, grad.contiguous(), h, m, layout)
        return d_series, None, None, None, None


def token_squarings_plain(series: Tensor, js: Tensor, h: int, m: int, layout: str) -> Tensor:
    """``KernelSquarings`` in plain autograd ops (the reference; double backward).

    Shape:
        series in ``layout`` (``_kernels.LAYOUTS``); js ``(N,)`` -> ``(h, N, m, s, s)``
    """
    count, size = js.shape[0], _kernels.block_size_of(series, layout)
    if layout == "entry":
        out = series.view(size, size, h * m, count).permute(3, 2, 0, 1)
    elif layout == "batch":
        out = series.view(count, h * m, size, size)
    elif layout == "rows":
        out = series.view(h * m, size, count, size).permute(2, 0, 1, 3)
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

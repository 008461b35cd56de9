"""Taylor series with scaling and squaring for skew blocks, and the small-block product layout.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .token_squarings import token_squarings_plain

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
TAYLOR = {torch.float32: (4, 3, 1.3), torch.float64: (5, 4, 1.0)}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype rotations are built in: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# Note [small-block layout]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# Batched products of many tiny matrices are slow through BLAS: on a 2-core AVX-512 CPU,
# torch.bmm of 9,408 8x8 matrices runs at about 9 GFLOP/s (most of the time is per-matrix
# overhead). Blocks up to ENTRY_MAJOR_MAX_BLOCK are therefore exponentiated "entry-major":
# a batch is stored as (s, s, N), each matrix entry a contiguous row over the batch, and a
# product C = A @ B is s fused multiply-adds over whole rows,
# C[:, :] += A[:, j, None] * B[None, j, :] (j = 0..s-1): vectorised elementwise work with no
# per-matrix cost. Transposes are free (swap the first two dims). Larger blocks use bmm.
ENTRY_MAJOR_MAX_BLOCK = 8


# Rows of this many matrices at a time keep the accumulator of an entry-major product in
# cache (8x8: 4 MB); one pass over a 100 MB accumulator is memory-bound and ~5x slower.
ENTRY_MAJOR_CHUNK = 16384


def entry_major_mm(
    a: Tensor, b: Tensor, out: Optional[Tensor] = None, accumulate: bool = True
) -> Tensor:
    """``a @ b`` for entry-major batches ``(s, s, *batch)``, into ``out`` if given (``out +=``
    when ``accumulate``). Views whose last dim is a slice of a larger batch are fine."""
    size, count = a.shape[1], a.shape[-1]
    add = out is not None and accumulate
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1], *a.shape[2:])
    chunk = max(1, ENTRY_MAJOR_CHUNK // max(1, math.prod(a.shape[2:-1])))
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
    k, chunks, _ = TAYLOR[x.dtype]
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
        saved = ctx.saved_tensors
        x = saved[0]
        if torch.is_grad_enabled():  # create_graph=True: recompute differentiably
            with torch.enable_grad():
                out = _taylor_autograd(_as_batch_major(x, entry_major), 0)
                out = out.permute(1, 2, 0) if entry_major else out
                (d_x,) = torch.autograd.grad(out, x, grad, create_graph=True)
            return d_x, None
        return taylor_series_backward(grad, saved, entry_major), None


def taylor_series_backward(grad: Tensor, saved: tuple[Tensor, ...], entry_major: bool) -> Tensor:
    """``_TaylorSeries``' vector-Jacobian product, first order, no autograd. ``saved``: the
    powers ``X..X^k`` and every Horner step but the last, as ``_taylor_series(x, entry_major,
    keep=True)`` returns them (``(*powers, *horner[:-1])``)."""
    mm, tr, _ = _layout(entry_major)
    x = saved[0]
    k, chunks, _ = TAYLOR[x.dtype]
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
    return d_x


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
    """``_Squarings`` in plain autograd ops (double backward): ``token_squarings_plain`` with
    every (head, block) of a token as one block dim, back in ``t``'s layout."""
    n = t.shape[-1] if entry_major else t.shape[0]
    size = t.shape[0] if entry_major else t.shape[-1]
    js = (
        torch.arange(n, device=t.device).unsqueeze(0)
        < torch.tensor(counts, device=t.device).unsqueeze(1)
    ).sum(0)
    blocks = t.numel() // (n * size * size)
    out = token_squarings_plain(t, js, 1, blocks, "entry" if entry_major else "batch")[0]
    return (out.permute(2, 3, 1, 0) if entry_major else out).reshape(t.shape)


def _layout(entry_major: bool) -> tuple[Any, Any, Any]:
    """(product, transpose, diagonal) for the entry-major ``(s, s, N)`` or batch-major
    ``(N, s, s)`` layout."""
    if entry_major:
        return entry_major_mm, (lambda t: t.transpose(0, 1)), (lambda t: t.diagonal(0, 0, 1))
    return _batch_mm, (lambda t: t.mT), (lambda t: t.diagonal(0, -2, -1))


def _taylor_autograd(x: Tensor, squarings: int) -> Tensor:
    """The series of ``_TaylorSeries`` and ``squarings`` squarings in plain autograd ops
    (batch-major; differentiable to any order): double backward, and the few-token path
    (Note [few tokens]), where the fewest launched ops win.

    Shape:
        ``(N, s, s)`` -> ``(N, s, s)``
    """
    k, chunks, _ = TAYLOR[x.dtype]
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
    for dtype, (k, chunks, _) in TAYLOR.items()
}


def taylor_expm_squared(x: Tensor, squarings: int) -> Tensor:
    """``T(X)^(2^squarings)`` with ``T`` the truncated Taylor series of exp; ``X`` already scaled.

    Shape:
        ``(N, s, s)`` -> ``(N, s, s)``
    """
    if x.shape[-1] <= ENTRY_MAJOR_MAX_BLOCK:
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

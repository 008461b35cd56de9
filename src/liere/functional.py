"""Pure tensor maths of rotary position encodings: ``x' = exp(sum_a p_a A_a) x``.

Axis letters used in every ``Shape:`` section: ``b`` batch, ``h`` heads, ``n`` tokens,
``d`` head_dim, ``a`` position axes, ``m`` blocks per head (``d // s``), ``s`` block size,
``k`` rotary pairs (``d // 2``).

Nothing here owns parameters; the modules in ``liere.encodings`` call these functions.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "skew_symmetric",
    "block_generators",
    "expm_skew",
    "expm_skew_reference",
    "lie_rotations",
    "squarings_for",
    "apply_blockwise",
    "apply_blockwise_pair",
    "rope_angles",
    "apply_rope",
    "compute_dtype",
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
# handful of large batched GEMMs, and autograd through the products costs about twice the
# forward (matrix_exp's backward costs about 8x).
# (k powers, chunks, theta): degree k * chunks - 1
_TAYLOR = {torch.float32: (4, 3, 1.3), torch.float64: (5, 4, 1.0)}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype rotations are built in: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def skew_symmetric(params: Tensor, size: int) -> Tensor:
    """``A = U - U^T`` from the strictly upper-triangular entries of ``U`` (row-major).

    The result is exactly skew-symmetric (``A == -A.mT`` bit for bit).

    Shape:
        params ``(..., size * (size - 1) // 2)`` -> ``(..., size, size)``
    """
    expected = size * (size - 1) // 2
    if params.shape[-1] != expected:
        raise ValueError(
            f"params must end in size*(size-1)/2 = {expected} entries for size {size}; "
            f"got shape {tuple(params.shape)}."
        )
    rows, cols = torch.triu_indices(size, size, offset=1, device=params.device)
    upper = params.new_zeros(*params.shape[:-1], size, size)
    upper[..., rows, cols] = params
    return upper - upper.mT


def block_generators(positions: Tensor, bases: Tensor) -> Tensor:
    """``G[.., h, n, m] = sum_a p[.., n, a] * B[h, a, m]`` as one GEMM over all blocks.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)``
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    h, a, m, s, _ = bases.shape
    flat = bases.reshape(h, a, m * s * s)
    gen = torch.matmul(positions.unsqueeze(-3), flat)  # (.., h, n, m*s*s)
    return gen.unflatten(-1, (m, s, s))


def _taylor_expm_squared(x: Tensor, squarings: int) -> Tensor:
    """``T(X)^(2^squarings)`` with ``T`` the truncated Taylor series of exp; ``X`` already scaled.

    Shape:
        ``(N, s, s)`` -> ``(N, s, s)``
    """
    k, chunks, _ = _TAYLOR[x.dtype]
    powers = [x]
    for _ in range(k - 1):
        powers.append(torch.bmm(powers[-1], x))
    # Paterson-Stockmeyer: exp(X) ~ sum_c B_c X^(kc) with B_c = sum_{i<k} X^i / (ck+i)!,
    # evaluated by Horner in X^k. B_c is built with in-place scaled adds (one memory pass per
    # term) and each Horner step is one fused baddbmm: at small blocks and on CPUs with little
    # memory bandwidth these passes cost as much as the products.
    result: Optional[Tensor] = None
    for c in reversed(range(chunks)):
        first = c * k
        block = powers[0] * (1.0 / math.factorial(first + 1))
        for i in range(2, k):
            block.add_(powers[i - 1], alpha=1.0 / math.factorial(first + i))
        block.diagonal(dim1=-2, dim2=-1).add_(1.0 / math.factorial(first))
        result = block if result is None else torch.baddbmm(block, result, powers[-1])
    assert result is not None
    for _ in range(squarings):
        result = torch.bmm(result, result)
    return result


# Note [extrapolation]: float32 rotations lose orthogonality in proportion to the generator
# norm. Measured by benchmarks/extrapolation.py (paper init, seed 0, 14x14 grid scaled):
# 8x8 blocks max|R^T R - I| = 6.6e-6 at 1x the training range (||G|| = 40), 4.8e-5 at 8x
# (||G|| = 318), about 1.6e-7 * ||G||; dense 64x64 6.5e-5 at 1x (||G|| = 262), 1.6e-4 at 8x
# (||G|| = 2,096). The tests hold it to 10 * s * eps * max(1, ||G||). Past ||G|| = 2^14 the
# error passes 1e-3 and keeps growing, so a RuntimeWarning says so; float64 inputs are accurate
# to about 1e-16 * ||G||.
LARGE_NORM = {torch.float32: 2.0**14, torch.float64: 2.0**40}


def _warn_if_inaccurate(norm: float, dtype: torch.dtype) -> None:
    if norm > LARGE_NORM.get(dtype, math.inf):
        warnings.warn(
            f"generator norm {norm:.3g} is beyond {LARGE_NORM[dtype]:.3g}: {dtype} rotations "
            f"lose orthogonality (error about {1.6e-7 * norm:.1e} in float32). Positions far "
            f"outside the training range? Rescale them, or pass float64 q/k.",
            RuntimeWarning,
            stacklevel=3,
        )


def squarings_for(norm_bound: float, dtype: torch.dtype = torch.float32) -> int:
    """Squarings ``j`` so that a generator of norm <= ``norm_bound`` scaled by ``2^-j`` is
    within the Taylor series' accurate range for ``dtype`` (Note [Taylor scaling and
    squaring]); raises on NaN/Inf."""
    if not math.isfinite(norm_bound):
        raise ValueError(
            "the generators contain NaN or Inf (from non-finite positions or parameters); "
            "cannot exponentiate them."
        )
    theta = _TAYLOR[dtype][2]
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


def lie_rotations(positions: Tensor, bases: Tensor, *, method: str = "auto") -> Tensor:
    """``R[.., h, n, m] = exp(sum_a p[.., n, a] B[h, a, m])`` for every token and block.

    The fast path never materialises an unscaled generator: the number of squarings ``j``
    comes from the bound ``||sum_a p_a B_a||_2 <= sum_a |p_a| ||B_a||_2`` (exact spectral norms
    of the few basis blocks; tight for skew-symmetric, hence normal, matrices), ``2^-j`` is
    folded into the bases before the single GEMM, then the Taylor series and ``j`` squarings
    follow (Note [Taylor scaling and squaring]). ``method`` as in ``expm_skew``.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)`` (skew-symmetric)
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    size = bases.shape[-1]
    if method != "auto" or size <= 2 or is_tracing():
        return expm_skew(block_generators(positions, bases), method=method)
    if bases.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lie_rotations computes in float32 or float64; got {bases.dtype}.")
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(bases.detach(), ord=2)  # (h, a, m)
        bound = torch.matmul(positions.detach().abs().unsqueeze(-3), sigma)  # (.., h, n, m)
        norm = float(bound.amax()) if bound.numel() else 0.0
    squarings = squarings_for(norm, bases.dtype)
    _warn_if_inaccurate(norm, bases.dtype)
    gen = block_generators(positions, bases * (2.0**-squarings) if squarings else bases)
    out = _taylor_expm_squared(gen.reshape(-1, size, size), squarings)
    return out.reshape(gen.shape)


def expm_skew_reference(gen: Tensor) -> Tensor:
    """``torch.linalg.matrix_exp`` over a flattened batch (the reference path).

    Flattening first avoids matrix_exp's "view size is not compatible" failure on batches
    whose dims cannot be merged (permuted or einsum outputs).

    Shape:
        ``(..., s, s)`` -> ``(..., s, s)``
    """
    size = gen.shape[-1]
    return torch.linalg.matrix_exp(gen.reshape(-1, size, size)).reshape(gen.shape)


def is_tracing() -> bool:
    """True while torch.compile, torch.export, TorchScript tracing or ONNX export traces the
    code: data-dependent choices (the squaring count, caches, input checks) are skipped then."""
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        if compiler is not None and hasattr(compiler, name) and getattr(compiler, name)():
            return True
    if torch.jit.is_tracing():
        return True
    in_onnx_export = getattr(getattr(torch, "onnx", None), "is_in_onnx_export", None)
    return bool(in_onnx_export is not None and in_onnx_export())


def apply_blockwise(x: Tensor, rotations: Tensor) -> Tensor:
    """``x'[.., m*s:(m+1)*s] = R[.., m] @ x[.., m*s:(m+1)*s]`` for every block ``m``.

    The batch is the GEMM's column dimension: rotations are never copied over the batch.
    A heads dim of 1 in ``rotations`` is shared by every head of ``x``.

    Shape:
        x ``(b, h, n, d)``; rotations ``(h | 1, n, m, s, s)`` (shared by the batch) or
        ``(b, h | 1, n, m, s, s)`` (per sample), with ``m * s == d`` -> ``(b, h, n, d)``
    """
    m, s = rotations.shape[-3], rotations.shape[-1]
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


def apply_blockwise_pair(q: Tensor, k: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
    """``apply_blockwise`` to q and k with one batched product (their columns side by side).

    With rotations shared by the batch, the GEMM is ``(s, s) @ (s, 2b)`` per (head, token,
    block), or ``(s, s) @ (s, 2bh)`` when one rotation serves every head.

    Shape:
        q, k ``(b, h, n, d)`` (same shape and dtype); rotations as in ``apply_blockwise``
        -> ``(b, h, n, d)`` each
    """
    if q.shape != k.shape or q.dtype != k.dtype:
        return apply_blockwise(q, rotations), apply_blockwise(k, rotations)
    b, h, n, d = q.shape
    m, s = rotations.shape[-3], rotations.shape[-1]
    if rotations.dim() == 6:
        # per sample: (b, h', n, m, s, s) @ (b, h, n, m, s, 2)
        x = torch.stack((q.unflatten(-1, (m, s)), k.unflatten(-1, (m, s))), dim=-1)
        out = torch.matmul(rotations, x)
        return out[..., 0].flatten(-2), out[..., 1].flatten(-2)
    if rotations.shape[0] == 1:
        # one rotation for every head: columns are (q|k, batch, head)
        xq = q.unflatten(-1, (m, s)).permute(2, 3, 4, 0, 1)  # n m s b h
        xk = k.unflatten(-1, (m, s)).permute(2, 3, 4, 0, 1)
        x = torch.stack((xq, xk), dim=3).reshape(n * m, s, 2 * b * h)
        out = torch.bmm(rotations.reshape(n * m, s, s), x).view(n, m, s, 2, b, h)
        out = out.permute(3, 4, 5, 0, 1, 2)  # 2 b h n m s
    else:
        xq = q.unflatten(-1, (m, s)).permute(1, 2, 3, 4, 0)  # h n m s b
        xk = k.unflatten(-1, (m, s)).permute(1, 2, 3, 4, 0)
        x = torch.cat((xq, xk), dim=-1).reshape(h * n * m, s, 2 * b)
        out = torch.bmm(rotations.reshape(h * n * m, s, s), x).view(h, n, m, s, 2, b)
        out = out.permute(4, 5, 0, 1, 2, 3)  # 2 b h n m s
    return out[0].reshape(b, h, n, d), out[1].reshape(b, h, n, d)


def rope_angles(positions: Tensor, freqs: Tensor) -> Tensor:
    """``theta[.., h, n, k] = sum_a p[.., n, a] * f[h, a, k]`` (one GEMM).

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; freqs ``(h, a, k)``
        -> ``(h, n, k)`` or ``(b, h, n, k)``
    """
    return torch.matmul(positions.unsqueeze(-3), freqs)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each adjacent channel pair ``(x[2k], x[2k+1])`` by its angle.

    ``x'[2k] = x[2k] cos - x[2k+1] sin``, ``x'[2k+1] = x[2k] sin + x[2k+1] cos``: the rotation
    ``exp(theta [[0, -1], [1, 0]])``, i.e. a 2x2 LieRE block whose upper entry is ``-theta``.

    Shape:
        x ``(b, h, n, 2k)``; cos, sin broadcastable to ``(b, h, n, k)`` -> ``(b, h, n, 2k)``
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

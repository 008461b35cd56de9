"""Pure tensor maths of rotary position encodings: ``x' = exp(sum_a p_a A_a) x``.

Axis letters used in every ``Shape:`` section: ``b`` batch, ``h`` heads, ``n`` tokens,
``d`` head_dim, ``a`` position axes, ``m`` blocks per head (``d // s``), ``s`` block size,
``k`` rotary pairs (``d // 2``).

Nothing here owns parameters; the modules in ``liere.encodings`` call these functions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "skew_symmetric",
    "block_generators",
    "expm_skew",
    "expm_skew_reference",
    "apply_blockwise",
    "rope_angles",
    "apply_rope",
    "compute_dtype",
]

# Note [Taylor scaling and squaring]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# exp(G) = exp(G / 2^j)^(2^j). We pick one j for the whole batch so that the scaled
# generators have 1-norm <= 1, evaluate a truncated Taylor series with Paterson-Stockmeyer
# (few matrix products for a high degree) and square j times. With ||X||_1 <= 1 the
# truncation error is below 1/(degree+1)!: degree 11 -> 2e-9 (float32 unit roundoff is 6e-8),
# degree 19 -> 4e-19 (float64: 1.1e-16). Each squaring at most doubles the error already
# there, so the final error grows like ||G|| * eps: this is why the orthogonality tolerance in
# the tests carries a max(1, ||A||) factor. One j for all matrices (instead of torch.matrix_exp's
# per-matrix choice) keeps the batch in a handful of large batched GEMMs, and autograd through
# the products costs about twice the forward (matrix_exp's backward costs about 8x).
_TAYLOR = {torch.float32: (4, 3), torch.float64: (5, 4)}  # (k powers, chunks): degree k*c-1


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


def _scaled_taylor_expm(gen: Tensor, squarings: int) -> Tensor:
    powers_needed, chunks = _TAYLOR[gen.dtype]
    x = gen * (2.0**-squarings) if squarings else gen
    eye = torch.eye(gen.shape[-1], dtype=gen.dtype, device=gen.device)
    powers = [x]
    for _ in range(powers_needed - 1):
        powers.append(torch.matmul(powers[-1], x))
    # Horner in X^k over chunks of k coefficients: sum_c (sum_i x^i / (ck+i)!) X^(kc)
    top = powers[-1]
    result: Optional[Tensor] = None
    for c in reversed(range(chunks)):
        first = c * powers_needed
        block = eye / math.factorial(first)
        for i in range(1, powers_needed):
            block = block + powers[i - 1] / math.factorial(first + i)
        result = block if result is None else block + torch.matmul(result, top)
    assert result is not None
    for _ in range(squarings):
        result = torch.matmul(result, result)
    return result


def _squarings_for(gen: Tensor) -> int:
    norm = float(gen.detach().abs().sum(dim=-2).amax()) if gen.numel() else 0.0
    if not math.isfinite(norm):
        raise ValueError(
            "the generators contain NaN or Inf (from non-finite positions or parameters); "
            "cannot exponentiate them."
        )
    return max(0, math.ceil(math.log2(norm))) if norm > 1.0 else 0


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
    if method == "matrix_exp" or (method == "auto" and size > 2 and _is_compiling()):
        return expm_skew_reference(gen)
    if method == "auto" and size == 1:
        return torch.ones_like(gen)
    if method == "auto" and size == 2:
        t = gen[..., 0, 1]
        c, s = torch.cos(t), torch.sin(t)
        return torch.stack((torch.stack((c, s), -1), torch.stack((-s, c), -1)), -2)
    return _scaled_taylor_expm(gen, _squarings_for(gen))


def expm_skew_reference(gen: Tensor) -> Tensor:
    """``torch.linalg.matrix_exp`` over a flattened batch (the reference path).

    Flattening first avoids matrix_exp's "view size is not compatible" failure on batches
    whose dims cannot be merged (permuted or einsum outputs).

    Shape:
        ``(..., s, s)`` -> ``(..., s, s)``
    """
    size = gen.shape[-1]
    return torch.linalg.matrix_exp(gen.reshape(-1, size, size)).reshape(gen.shape)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False


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

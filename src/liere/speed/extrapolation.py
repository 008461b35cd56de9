"""Accuracy at large generator norms: the error bound, its warning, re-orthogonalisation, and
the squaring count of a batch; ``expm_skew``.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from liere.definition import (
    expm_skew_reference,
)

from .taylor import TAYLOR, taylor_expm_squared
from .tracing import is_tracing

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
        out.index_copy_(0, chunk, newton_schulz_step(flat.index_select(0, chunk)))
    return out.view(rotations.shape)


def newton_schulz_step(rotations: Tensor) -> Tensor:
    """``R - R (R^T R - I) / 2`` in float64 (Note [re-orthogonalisation]), back in
    ``rotations``' dtype.

    Shape:
        ``(..., s, s)`` -> ``(..., s, s)``
    """
    r = rotations.double()
    error = torch.matmul(r.mT, r)
    error.diagonal(dim1=-2, dim2=-1).sub_(1.0)  # R^T R - I
    return (r - 0.5 * torch.matmul(r, error)).to(rotations.dtype)


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
    theta = TAYLOR[dtype][2] if theta is None else theta
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
    return taylor_expm_squared(x * (2.0**-squarings), squarings).reshape(gen.shape)

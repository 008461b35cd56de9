"""Assertions for the positional behaviour of encodings and attention modules.

Import without pytest or hypothesis installed; ``liere.testing.strategies`` needs hypothesis.
Every ``assert_*`` raises ``AssertionError`` whose message holds the measured figure and the
tolerance it was held to.

Default orthogonality tolerance (``orthogonality_tolerance``)::

    atol = 10 * d * eps(dtype) + 2 * liere.functional.rotation_error_bound(||A(p)||_2, dtype)
         = 10 * d * eps(dtype) + 4 * eps(dtype) * ||A(p)||_2

``d`` is head_dim, ``eps`` the machine epsilon of the dtype the rotation is computed in
(float32 for half inputs), and ``||A(p)||_2`` the largest generator norm over the positions
(``RotaryEncoding.generator_norm``; 1 for modules without one). The first term is the rounding
of the products over ``d`` channels; the second is twice the library's own extrapolation bound
(the scaling-and-squaring exponential's error grows with the norm), so the tolerance at large
positions is the figure the library itself warns about, not a multiple of ``d`` of it.

Every assertion fails on NaN or Inf anywhere in what it measures. Positions may be shared
``(n, a)`` or per sample ``(b, n, a)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..functional import rotation_error_bound

__all__ = [
    "orthogonality_tolerance",
    "orthogonality_error",
    "assert_orthogonal",
    "relative_position_error",
    "relative_tolerance",
    "assert_relative",
    "axis_sensitivity",
    "assert_uses_all_axes",
    "permutation_equivariance_error",
    "assert_permutation_equivariant",
]


def _attr(encoding: Any, name: str, default: Any) -> Any:
    return getattr(encoding, name, default)


def _compute_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _check_finite(what: str, *tensors: Tensor) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise AssertionError(f"{what} contains NaN or Inf.")


def _generator_norm(encoding: Any, positions: Tensor) -> float:
    norm_fn = _attr(encoding, "generator_norm", None)
    return float(norm_fn(positions)) if callable(norm_fn) else 1.0


def _random_qk(
    encoding: Any, positions: Tensor, batch: int, dtype: torch.dtype, seed: int
) -> tuple[Tensor, Tensor]:
    d = _attr(encoding, "head_dim", None)
    if d is None:
        raise ValueError("encoding has no head_dim attribute; pass head_dim=... explicitly.")
    heads = max(1, _attr(encoding, "num_heads", 1))
    n = positions.shape[-2]
    b = positions.shape[0] if positions.dim() == 3 else batch
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, heads, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, heads, n, d, generator=gen, dtype=torch.float64)
    return q.to(device=positions.device, dtype=dtype), k.to(device=positions.device, dtype=dtype)


def _check_positions(positions: Any, where: str) -> Tensor:
    if not isinstance(positions, Tensor) or positions.dim() not in (2, 3):
        shape = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions)
        raise ValueError(
            f"{where} takes positions of shape (tokens, axes) or (batch, tokens, axes); "
            f"got {shape}."
        )
    return positions


def orthogonality_tolerance(encoding: Any, positions: Tensor, dtype: torch.dtype) -> float:
    """``10 * d * eps(dtype) + 2 * rotation_error_bound(||A(p)||_2, dtype)``: see the module
    docstring."""
    d = _attr(encoding, "head_dim", 1)
    norm = _generator_norm(encoding, positions)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return 10.0 * d * _compute_eps(dtype) + 2.0 * rotation_error_bound(max(1.0, norm), compute)


def orthogonality_error(
    encoding: Any, positions: Tensor, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> float:
    """Largest change of an inner product ``<x_i, x_j>`` between vectors at the same token,
    head (and sample), relative to ``|x_i| |x_j|``, over ``head_dim + 1`` random vectors
    (enough to span the space, so this is 0 exactly when every ``R(p)`` is orthogonal on all
    of it). NaN when the encoding returns NaN.

    Per-sample positions ``(b, n, a)`` are repeated ``head_dim + 1`` times along the batch, so
    every sample's rotations meet ``head_dim + 1`` vectors through the per-sample path.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``
    """
    positions = _check_positions(positions, "orthogonality_error")
    d = _attr(encoding, "head_dim", None)
    if d is None:
        raise ValueError("encoding has no head_dim attribute.")
    vectors = d + 1
    per_sample = positions.dim() == 3
    samples = positions.shape[0] if per_sample else 1
    if per_sample:  # sample-major: rows [i * vectors, (i + 1) * vectors) belong to sample i
        positions = positions.repeat_interleave(vectors, dim=0)
    q, k = _random_qk(encoding, positions, vectors, dtype, seed)
    with torch.no_grad():
        q_out, k_out = encoding(q, k, positions)
    worst = torch.zeros((), dtype=torch.float64)
    for before, after in ((q, q_out), (k, k_out)):
        # (samples, vectors, h, n, d) -> Gram matrices over the vectors at every
        # (sample, head, token): (samples, h, n, vectors, vectors)
        before = before.double().unflatten(0, (samples, vectors))
        after = after.double().unflatten(0, (samples, vectors))
        gram_in = torch.einsum("sbhnd,schnd->shnbc", before, before)
        gram_out = torch.einsum("sbhnd,schnd->shnbc", after, after)
        norms = before.norm(dim=-1).permute(0, 2, 3, 1)  # s h n b
        scale = norms.unsqueeze(-1) * norms.unsqueeze(-2)
        # torch.maximum and amax propagate NaN (Python's max would drop it)
        worst = torch.maximum(worst, ((gram_out - gram_in).abs() / scale).amax().cpu())
    return float(worst)


def assert_orthogonal(
    encoding: Any,
    positions: Tensor,
    *,
    atol: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> None:
    """Assert that ``encoding`` rotates q and k orthogonally at every position.

    Random vectors (seeded) keep their norms and mutual inner products within ``atol``
    (relative to their norms); the default is ``orthogonality_tolerance``. Fails on NaN/Inf.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``
    """
    error = orthogonality_error(encoding, positions, dtype=dtype, seed=seed)
    if not math.isfinite(error):
        raise AssertionError("rotations are not orthogonal: the encoding returned NaN or Inf.")
    tol = orthogonality_tolerance(encoding, positions, dtype) if atol is None else atol
    if not error <= tol:
        raise AssertionError(
            f"rotations are not orthogonal: inner products changed by {error:.3e} "
            f"(relative), tolerance {tol:.3e}."
        )


def _scores(encoding: Any, q: Tensor, k: Tensor, positions: Tensor) -> Tensor:
    with torch.no_grad():
        q_out, k_out = encoding(q, k, positions)
    _check_finite("the encoding's output", q_out, k_out)
    return torch.einsum("bhid,bhjd->bhij", q_out.double(), k_out.double())


def relative_position_error(
    encoding: Any,
    positions: Tensor,
    shift: Any,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> float:
    """How much attention scores ``q_i . k_j`` change when every position moves by ``shift``.

    Returns ``max |S(p + shift) - S(p)| / max |S(p)|`` for seeded random q, k. It is zero (up to
    rounding) for encodings whose scores depend on ``p_j - p_i`` only: RoPE, block-2 LieRE,
    any 1-axis LieRE; dense 2D LieRE gives a clearly positive figure. NaN/Inf raise
    ``AssertionError``.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; shift ``(a,)`` (or anything that broadcasts to it)
    """
    positions = _check_positions(positions, "relative_position_error")
    q, k = _random_qk(encoding, positions, 2, dtype, seed)
    shift_t = torch.as_tensor(shift, dtype=positions.dtype, device=positions.device)
    before = _scores(encoding, q, k, positions)
    after = _scores(encoding, q, k, positions + shift_t)
    return float((after - before).abs().max() / before.abs().max())


def relative_tolerance(
    encoding: Any,
    positions: Tensor,
    shift: Any,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> float:
    """Default tolerance of ``assert_relative`` for one shift, from the dtypes of positions
    and scores:

    - rounding of the rotations: ``100 * eps(dtype) * max(1, ||A||_2)`` at the larger of the
      generator norms before and after the shift;
    - rounding of the shifted positions themselves: ``p + shift`` in the positions' dtype
      moves each coordinate by ``delta`` (computed exactly, in float64), which turns a token's
      vector by at most ``||A(delta)||_2`` (``generator_norm`` of ``delta``), so a score by at
      most ``2 ||A(delta)|| |q| |k|``; relative to the largest score of the same seeded q and k,
      times 2.
    """
    positions = _check_positions(positions, "relative_tolerance")
    shift_t = torch.as_tensor(shift, dtype=positions.dtype, device=positions.device)
    moved = positions + shift_t
    norm = max(_generator_norm(encoding, moved), _generator_norm(encoding, positions))
    rounding = 100.0 * _compute_eps(dtype) * max(1.0, norm)
    delta = moved.double() - (positions.double() + shift_t.double())
    if not bool(delta.any()):
        return rounding
    q, k = _random_qk(encoding, positions, 2, dtype, seed)
    lengths_q, lengths_k = q.double().norm(dim=-1), k.double().norm(dim=-1)
    largest = float(_scores(encoding, q, k, positions).abs().max())
    bound = 2.0 * _generator_norm(encoding, delta.abs()) * float(lengths_q.max() * lengths_k.max())
    return rounding + 2.0 * bound / largest


def assert_relative(
    encoding: Any,
    positions: Tensor,
    shift: Any = None,
    *,
    atol: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> None:
    """Assert that scores depend only on relative positions: shifting all positions by
    ``shift`` (default: three seeded random shifts of unit scale) changes no score by more than
    ``atol`` relative to the largest score.

    Default ``atol``: ``relative_tolerance`` (the rounding of the rotations in ``dtype`` plus
    that of ``positions + shift`` in the positions' own dtype), so float32 positions work.
    Fails on NaN/Inf.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``
    """
    positions = _check_positions(positions, "assert_relative")
    a = positions.shape[-1]
    if shift is None:
        gen = torch.Generator().manual_seed(seed + 1)
        shifts = [torch.randn(a, generator=gen, dtype=torch.float64) for _ in range(3)]
    else:
        shifts = [torch.as_tensor(shift, dtype=torch.float64)]
    for s in shifts:
        s = s.to(dtype=positions.dtype, device=positions.device)
        error = relative_position_error(encoding, positions, s, dtype=dtype, seed=seed)
        if not math.isfinite(error):
            raise AssertionError("scores are NaN or Inf.")
        tol = (
            relative_tolerance(encoding, positions, s, dtype=dtype, seed=seed)
            if atol is None
            else atol
        )
        if not error <= tol:
            raise AssertionError(
                f"scores are not relative: shifting positions by {s.tolist()} changed them by "
                f"{error:.3e} (relative to the largest score), tolerance {tol:.3e}."
            )


def axis_sensitivity(
    encoding: Any, positions: Tensor, *, dtype: torch.dtype = torch.float64, seed: int = 0
) -> list[float]:
    """For each axis, how much scores change when only that axis's coordinates are jittered
    (seeded noise of unit scale, different per token), relative to the largest score.

    An axis the encoding ignores gives 0.

    Shape:
        positions ``(n, a)`` -> a list of ``a`` floats
    """
    q, k = _random_qk(encoding, positions, 2, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    noise = torch.randn(positions.shape, generator=gen, dtype=torch.float64)
    noise = noise.to(dtype=positions.dtype, device=positions.device)
    before = _scores(encoding, q, k, positions)
    out = []
    for axis in range(positions.shape[-1]):
        moved = positions.clone()
        moved[..., axis] += noise[..., axis]
        after = _scores(encoding, q, k, moved)
        out.append(float((after - before).abs().max() / before.abs().max()))
    return out


def assert_uses_all_axes(
    encoding: Any,
    positions: Tensor,
    *,
    min_effect: float = 1e-3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> None:
    """Assert that every coordinate axis changes the attention scores (``axis_sensitivity``
    above ``min_effect`` for each axis), catching encodings that silently drop an axis."""
    effects = axis_sensitivity(encoding, positions, dtype=dtype, seed=seed)
    for axis, effect in enumerate(effects):
        if not effect > min_effect:
            raise AssertionError(
                f"axis {axis} does not affect the scores: jittering it changed them by "
                f"{effect:.3e} (relative), not above min_effect {min_effect:.3e}."
            )


def permutation_equivariance_error(
    module: Callable[..., Tensor],
    x: Tensor,
    positions: Tensor,
    *,
    num_prefix_tokens: int = 0,
    seed: int = 0,
) -> tuple[float, float]:
    """``(equivariance_error, position_effect)`` of ``module(x, positions)``.

    ``equivariance_error``: ``max |f(P x, P p) - P f(x, p)| / max |f(x, p)|`` for a seeded
    permutation ``P`` of the non-prefix tokens (tokens move with their positions).
    ``position_effect``: the same norm of ``f(x, P p) - f(x, p)`` (positions move alone), which
    is 0 for a module that ignores its positions.

    Shape:
        x ``(b, num_prefix_tokens + n, ...)``; positions ``(n, a)`` or ``(b, n, a)``
    """
    p = num_prefix_tokens
    n = x.shape[1] - p
    if n != positions.shape[-2]:
        raise ValueError(
            f"x has {x.shape[1]} tokens, {p} of them prefix, so positions need {n} rows; "
            f"got positions of shape {tuple(positions.shape)}."
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    if n > 1 and bool((perm == torch.arange(n)).all()):
        perm = perm.roll(1)
    perm = perm.to(x.device)
    full = torch.cat((torch.arange(p, device=x.device), perm + p))
    pos_dim = positions.dim() - 2
    with torch.no_grad():
        out = module(x, positions)
        moved = module(x.index_select(1, full), positions.index_select(pos_dim, perm))
        positions_only = module(x, positions.index_select(pos_dim, perm))
    _check_finite("the module's output", out, moved, positions_only)
    scale = out.double().abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    equivariance = float((moved.double() - out.index_select(1, full).double()).abs().max() / scale)
    effect = float((positions_only.double() - out.double()).abs().max() / scale)
    return equivariance, effect


def assert_permutation_equivariant(
    module: Callable[..., Tensor],
    x: Tensor,
    positions: Tensor,
    *,
    num_prefix_tokens: int = 0,
    atol: Optional[float] = None,
    require_position_effect: bool = True,
    seed: int = 0,
) -> None:
    """Assert ``module(P x, P p) == P module(x, p)`` for a permutation ``P`` of the tokens
    after the first ``num_prefix_tokens`` (which stay in place), and, unless
    ``require_position_effect=False``, that moving the positions alone changes the output (so
    the check is not passed vacuously by a module that ignores positions).

    Works on ``RotaryAttention``, whole blocks, and any module called as ``module(x, positions)``.
    Default ``atol``: ``1000 * eps(x.dtype)`` relative to the largest output (float32 sums over
    tokens in another order are not bit-identical). The position effect must exceed
    ``max(10 * equivariance_error, 10 * eps(x.dtype))``.
    """
    equivariance, effect = permutation_equivariance_error(
        module, x, positions, num_prefix_tokens=num_prefix_tokens, seed=seed
    )
    tol = 1000.0 * torch.finfo(x.dtype).eps if atol is None else atol
    if not equivariance <= tol:
        raise AssertionError(
            f"module is not permutation-equivariant: moving tokens with their positions changed "
            f"the output by {equivariance:.3e} (relative), tolerance {tol:.3e}."
        )
    # The measured equivariance error is the noise floor a real position effect must clear.
    floor = max(10.0 * equivariance, 10.0 * torch.finfo(x.dtype).eps)
    if require_position_effect and not effect > floor:
        raise AssertionError(
            f"module output does not depend on positions: moving positions alone changed it by "
            f"{effect:.3e} (relative), not above the noise floor {floor:.3e} "
            f"(10x the equivariance error, at least 10 eps). Pass "
            f"require_position_effect=False if the module is meant to ignore positions."
        )

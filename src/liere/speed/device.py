"""The device-generic exponential: rotations with no value read on the host.

Part of the speed layer (``liere.speed``); the definition is ``liere.definition``.

Note [sync-free rotations]
~~~~~~~~~~~~~~~~~~~~~~~~~~
On a GPU every read of a value on the host (``float()``, ``int()``, ``bool()``, ``.tolist()``,
``nonzero``) waits for the device to finish all queued work. The CPU fast path reads its
squaring counts, ray plans and norm bound on the host, which is free there; off the CPU,
``lie_rotations`` takes this path instead, which reads nothing:

- each block's bound on ``||sum_a p_a B_a||_2`` is ``sum_a |p_a| ||B_a||_F / sqrt(2)``
  (``||G||_2 <= ||G||_F / sqrt(2)`` for skew-symmetric ``G``), elementwise; no ``eigvalsh``,
  which reads its convergence status on the host;
- every block gets its own squaring count ``j = ceil(log2(bound / theta))``, on the device,
  and its generator is scaled by ``2^-j`` (exact);
- the Paterson-Stockmeyer series of every block (``_series``), with the constants passed as
  Python scalars (a constant tensor would be copied to the device, and a pageable copy
  synchronises);
- ``L`` squaring levels, a block taking the square at level ``l`` only while ``l <= j``
  (``torch.where``), so the host needs ``L`` and nothing else.

``L`` comes from one of two places. With ``check_finite=True`` (the encodings' default) the
largest bound is read once: it raises on NaN/Inf (positions or parameters), warns past the
large-norm threshold (Note [extrapolation]), and gives the exact ``L``: one synchronisation
per call. With ``check_finite=False`` nothing is read and ``L`` covers every norm up to
``LARGE_NORM`` (14 levels in float32, 40 in float64); blocks beyond it, or with NaN/Inf
inputs, come out NaN (no host read can raise or warn). Re-orthogonalisation (Note
[re-orthogonalisation]) is a ``torch.where`` over every block then, instead of a gather of
the few that need it. Everything here is plain autograd ops: gradients of any order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from liere.definition import block_generators

from .extrapolation import (
    LARGE_NORM,
    REORTHOGONALIZE_ABOVE,
    _warn_if_inaccurate,
    newton_schulz_step,
    squarings_for,
)
from .taylor import TAYLOR


def max_levels(dtype: torch.dtype) -> int:
    """The squaring levels run with ``check_finite=False``: enough for every generator norm up
    to ``LARGE_NORM[dtype]`` (Note [sync-free rotations])."""
    return squarings_for(LARGE_NORM[dtype], dtype)


def lie_rotations_generic(
    positions: Tensor,
    bases: Tensor,
    *,
    reorthogonalize_above: Optional[float] = REORTHOGONALIZE_ABOVE,
    check_finite: bool = True,
) -> Tensor:
    """``exp(sum_a p_a B_a)`` per token and block on any device, reading at most one value on
    the host (``check_finite=True``) or none (Note [sync-free rotations]). ``lie_rotations``
    runs it off the CPU; on the CPU it is a reference for that path.

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)`` (skew-symmetric)
        -> ``(h, n, m, s, s)`` or ``(b, h, n, m, s, s)``
    """
    dtype = bases.dtype
    if dtype not in TAYLOR or positions.dtype != dtype:
        raise ValueError(
            f"lie_rotations computes in float32 or float64, positions and bases alike; got "
            f"positions {positions.dtype} and bases {dtype}."
        )
    theta = TAYLOR[dtype][2]
    bound = _norm_bounds(positions.detach(), bases.detach())  # (.., h, n, m)
    if check_finite:
        norm = float(bound.amax()) if bound.numel() else 0.0  # the one host read
        if not math.isfinite(norm):
            raise ValueError(
                "lie_rotations: the generators contain NaN or Inf (from non-finite positions or "
                "parameters); cannot exponentiate them. Check the data loader and the "
                "optimizer (a NaN loss?)."
            )
        _warn_if_inaccurate(norm, dtype)
        levels = squarings_for(norm, dtype)
        fix = reorthogonalize_above is not None and norm > reorthogonalize_above
    else:
        levels = max_levels(dtype)
        fix = reorthogonalize_above is not None
    fix = fix and dtype == torch.float32
    js = torch.where(
        bound > theta, torch.ceil(torch.log2(bound / theta)), torch.zeros_like(bound)
    ).clamp_(max=levels)
    gen = block_generators(positions, bases) * torch.exp2(-js)[..., None, None]
    size = gen.shape[-1]
    rot = _series(gen.reshape(-1, size, size)).view(gen.shape)
    for level in range(1, levels + 1):
        rot = torch.where((js >= level)[..., None, None], torch.matmul(rot, rot), rot)
    if fix:
        assert reorthogonalize_above is not None
        over = (bound > reorthogonalize_above)[..., None, None]
        rot = torch.where(over, newton_schulz_step(rot), rot)
    if not check_finite:  # out of range, NaN or Inf: NaN, never a wrong rotation
        bad = ~(bound <= theta * 2.0**levels)
        rot = torch.where(bad[..., None, None], torch.full_like(rot, math.nan), rot)
    return rot


def _norm_bounds(positions: Tensor, bases: Tensor) -> Tensor:
    """``sum_a |p_a| ||B_a||_F / sqrt(2)`` per token and block, elementwise (Note [sync-free
    rotations]).

    Shape:
        positions ``(n, a)`` or ``(b, n, a)``; bases ``(h, a, m, s, s)`` -> ``(.., h, n, m)``
    """
    sigma = torch.linalg.vector_norm(bases, dim=(-2, -1)) * 0.5**0.5  # (h, a, m)
    p = positions.abs().unsqueeze(-3).unsqueeze(-1)  # (.., 1, n, a, 1)
    return (p * sigma.unsqueeze(1)).sum(dim=-2)  # (.., h, n, m)


def _series(x: Tensor) -> Tensor:
    """The truncated Taylor series of exp (Note [Taylor scaling and squaring]) by
    Paterson-Stockmeyer, constants as Python scalars.

    Shape:
        ``(N, s, s)`` -> ``(N, s, s)``
    """
    k, chunks, _ = TAYLOR[x.dtype]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    powers = [x]
    for _ in range(k - 1):
        powers.append(torch.matmul(powers[-1], x))
    top = powers[-1]  # X^k

    def chunk(c: int) -> Tensor:  # sum_{i<k} X^i / (c k + i)!
        out = eye * (1.0 / math.factorial(c * k)) + powers[0] * (1.0 / math.factorial(c * k + 1))
        for i in range(2, k):
            out = out + powers[i - 1] * (1.0 / math.factorial(c * k + i))
        return out

    result = chunk(chunks - 1)
    for c in reversed(range(chunks - 1)):
        result = torch.baddbmm(chunk(c), result, top)
    return result

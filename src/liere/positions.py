"""Token coordinates for patch grids.

Note [position scale]
~~~~~~~~~~~~~~~~~~~~~
LieRE rotates by ``exp(sum_a p_a A_a)``: the rotation angle grows linearly with the
coordinates, and so does the norm of the generator that the exponential sees. The paper puts
every axis of the *training* grid on [0, 1] and lets a larger grid run past 1 (twice the
patches, about twice the range). The exponential's rounding error grows with
``|p| * |A|`` (see ``liere.functional.expm_skew``), so coordinates far outside the training
range (many times the reference) cost accuracy, and positions in raw patch indices (0..13 instead
of 0..1) make generators about ten times larger than the initialisation was chosen for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["grid_positions", "augment_positions"]


def _as_sizes(values: Sequence[int], name: str) -> tuple[int, ...]:
    sizes = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be positive integers; got {tuple(values)}.")
        sizes.append(int(value))
    return tuple(sizes)


def grid_positions(
    *sizes: int,
    reference: Optional[Union[int, Sequence[int]]] = None,
    device: Optional[Union[torch.device, str]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Coordinates ``p[i, a] = index_a(i) / (reference_a - 1)`` of a row-major patch grid.

    Each axis spans exactly [0, 1] when its size equals its reference size: index ``j`` of an
    axis sits at ``j / (reference - 1)`` (``torch.linspace(0, 1, reference)``). A grid larger
    than the reference keeps the same spacing, so it extends past 1 in proportion (a grid of
    ``2 * r`` patches spans ``[0, (2r - 1) / (r - 1)]``, about twice the range); a smaller grid
    covers only the start of [0, 1]. An axis whose reference size is 1 uses unit spacing.
    See Note [position scale].

    Args:
        *sizes: patches along each axis, e.g. ``grid_positions(14, 14)`` for a 14x14 image grid
            or ``grid_positions(8, 14, 14)`` for a clip of 8 frames.
        reference: the training grid (int for every axis, or one size per axis); defaults to
            ``sizes``, which puts every axis on [0, 1].
        device, dtype: of the result (a floating dtype).

    Shape:
        returns ``(prod(sizes), len(sizes))``; row ``i`` is the coordinate of the ``i``-th
        token of ``x.flatten(2)`` for an ``x`` of shape ``(B, C, *sizes)`` (last axis fastest).
    """
    if len(sizes) == 0:
        raise ValueError(
            "grid_positions needs at least one axis size, e.g. grid_positions(14, 14)."
        )
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    grid = _as_sizes(sizes, "sizes")
    if reference is None:
        ref = grid
    elif isinstance(reference, int) and not isinstance(reference, bool):
        ref = _as_sizes([reference] * len(grid), "reference")
    else:
        ref = _as_sizes(tuple(reference), "reference")  # type: ignore[arg-type]
        if len(ref) != len(grid):
            raise ValueError(
                f"reference must give one size per axis ({len(grid)} axes for sizes {grid}); "
                f"got {ref}."
            )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}.")
    axes = [
        torch.arange(n, device=device, dtype=torch.float64) / max(r - 1, 1)
        for n, r in zip(grid, ref)
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    positions = torch.stack(mesh, dim=-1).reshape(math.prod(grid), len(grid))
    return positions.to(dtype)


def _log_uniform(low_high: float, size: int, generator: Optional[torch.Generator]) -> Tensor:
    """``exp(U[-log f, log f])``: factors in ``[1/f, f]``, symmetric in log (float64, CPU)."""
    span = math.log(low_high)
    return torch.exp((torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * span)


def augment_positions(
    positions: Tensor,
    *,
    shift: float = 0.0,
    jitter: float = 1.0,
    rescale: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """DINOv3-style coordinate augmentation (training only): random shift, per-axis jitter and
    one overall rescale of the coordinates.

    With ``c`` the centre of the coordinates (per axis, the midpoint of their smallest and
    largest value: 0.5 on the training grid of ``grid_positions``), each draw maps

        ``p -> c + (p - c + t) * j * r``

    with a per-axis shift ``t ~ U[-shift, shift]`` (in position units: the training grid spans
    1), a per-axis jitter factor ``j`` log-uniform in ``[1/jitter, jitter]`` and one factor
    ``r`` log-uniform in ``[1/rescale, rescale]`` for all axes. DINOv3 applies the same order
    (shift, then the factors) to coordinates centred in [-1, 1]. The defaults are the identity
    (the input comes back unchanged, without drawing).

    ``(n, a)`` positions (shared by the batch): one draw per call, so the rotations stay
    shared. ``(b, n, a)``: one draw per sample, each about its own centre.

    Args:
        positions: coordinates, e.g. ``grid_positions(14, 14)``.
        shift: half-width of the uniform shift (>= 0).
        jitter, rescale: largest factor (>= 1).
        generator: a ``torch.Generator`` on the CPU for reproducible draws.

    Shape:
        ``(n, a)`` or ``(b, n, a)`` -> the same shape and dtype
    """
    if not isinstance(positions, Tensor) or positions.dim() not in (2, 3):
        shape = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions)
        raise ValueError(
            f"augment_positions takes positions of shape (tokens, axes) or "
            f"(batch, tokens, axes); got {shape}."
        )
    if not positions.is_floating_point():
        raise ValueError(f"positions must be floating point; got {positions.dtype}.")
    for name, value, least in (
        ("shift", shift, 0.0),
        ("jitter", jitter, 1.0),
        ("rescale", rescale, 1.0),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= least):
            raise ValueError(
                f"{name} must be a finite number >= {least:g} ({name}={least:g} is the "
                f"identity); got {value!r}."
            )
    if shift == 0.0 and jitter == 1.0 and rescale == 1.0:
        return positions
    samples = positions.shape[0] if positions.dim() == 3 else 1
    a = positions.shape[-1]
    shifts = (torch.rand(samples, a, generator=generator, dtype=torch.float64) * 2 - 1) * shift
    factors = _log_uniform(jitter, samples * a, generator).view(samples, a)
    factors = factors * _log_uniform(rescale, samples, generator).view(samples, 1)
    p = positions.double().reshape(samples, -1, a)
    if p.shape[1] == 0:
        return positions
    centre = (p.amax(dim=1, keepdim=True) + p.amin(dim=1, keepdim=True)) / 2
    dev = positions.device
    out = centre + (p - centre + shifts.to(dev).unsqueeze(1)) * factors.to(dev).unsqueeze(1)
    return out.reshape(positions.shape).to(positions.dtype)

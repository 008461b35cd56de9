"""Hypothesis strategies for positions, head sizes and dtypes (needs ``hypothesis``)."""

from __future__ import annotations

from typing import Optional

import torch
from hypothesis import strategies as st

from ..positions import grid_positions

__all__ = ["grid_sizes", "positions", "head_dims_and_block_sizes", "dtypes", "float_dtypes"]


@st.composite
def grid_sizes(draw: st.DrawFn, num_axes: int = 2, max_size: int = 6) -> tuple[int, ...]:
    """Patch-grid sizes, one per axis, each in [1, max_size]."""
    return tuple(draw(st.integers(1, max_size)) for _ in range(num_axes))


@st.composite
def positions(
    draw: st.DrawFn,
    num_axes: Optional[int] = None,
    *,
    kind: Optional[str] = None,
    batch: int = 2,
    max_tokens: int = 24,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinates of one of three kinds:

    ``"grid"``: ``grid_positions`` of a drawn grid, shape ``(n, a)``;
    ``"irregular"``: seeded uniform coordinates in ``[0, scale)``, shape ``(n, a)``;
    ``"per_sample"``: irregular coordinates per sample, shape ``(batch, n, a)``.
    """
    a = draw(st.integers(1, 3)) if num_axes is None else num_axes
    kind = draw(st.sampled_from(["grid", "irregular", "per_sample"])) if kind is None else kind
    if kind not in ("grid", "irregular", "per_sample"):
        raise ValueError(f"kind must be 'grid', 'irregular' or 'per_sample'; got {kind!r}.")
    if kind == "grid":
        sizes = draw(grid_sizes(a, max_size=max(1, int(round(max_tokens ** (1 / a))))))
        return grid_positions(*sizes, dtype=dtype) * scale
    n = draw(st.integers(1, max_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (n, a) if kind == "irregular" else (batch, n, a)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@st.composite
def head_dims_and_block_sizes(draw: st.DrawFn, max_head_dim: int = 32) -> tuple[int, int]:
    """``(head_dim, block_size)`` with an even head_dim and a block size >= 2 dividing it."""
    head_dim = 2 * draw(st.integers(1, max_head_dim // 2))
    block = draw(st.sampled_from([s for s in range(2, head_dim + 1) if head_dim % s == 0]))
    return head_dim, block


def float_dtypes() -> st.SearchStrategy[torch.dtype]:
    """float32 and float64 (exact comparisons against the float64 reference)."""
    return st.sampled_from([torch.float32, torch.float64])


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """Every dtype the encodings accept: float32/64, bfloat16, float16."""
    return st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])

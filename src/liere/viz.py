"""What an encoding learned, as numbers and pictures (plots need ``matplotlib``).

* ``spatial_kernel``: ``K[h, j] = tr(R_h(p_i)^T R_h(p_j)) / d`` for one query position ``i``,
  the expected score ``q . k`` of a unit random vector rotated to ``p_i`` (as query) and to
  ``p_j`` (as key), i.e. the similarity the encoding alone induces between positions. For RoPE
  it is ``mean_k cos(theta_k . (p_j - p_i))``, the same for every ``i``; LieRE's depends on
  ``p_i`` too.
* ``generator_spectra``: the rotation frequencies ``|omega|`` of every generator (its
  eigenvalues are ``+-i omega``).
* ``commutator_norms``: ``||[A_a, A_b]||_F / (||A_a||_F ||A_b||_F)`` per head and axis pair:
  0 when the generators commute (then LieRE is a RoPE in a learned basis, exactly relative),
  larger the further it is from that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .encodings import LieRE, RotaryEncoding
from .positions import grid_positions

__all__ = [
    "spatial_kernel",
    "generator_spectra",
    "commutator_norms",
    "plot_spatial_kernel",
    "plot_generator_spectra",
]


@torch.no_grad()
def spatial_kernel(encoding: RotaryEncoding, positions: Tensor, query_index: int) -> Tensor:
    """Similarity of the rotation at ``positions[query_index]`` to the rotation at every
    position: ``K[h, j] = tr(R_h(p_i)^T R_h(p_j)) / d`` (1 at ``j == i``).

    Shape:
        positions ``(n, a)`` -> ``(h', n)`` (``h'`` = the encoding's ``num_heads``)
    """
    n = positions.shape[0]
    if not -n <= query_index < n:
        raise ValueError(f"query_index {query_index} is out of range for {n} positions.")
    rot = encoding.rotation_matrices(positions.double())  # h n d d
    query = rot[:, query_index]  # h d d
    return torch.einsum("hde,hnde->hn", query, rot) / encoding.head_dim


@torch.no_grad()
def generator_spectra(encoding: LieRE) -> Tensor:
    """Rotation frequencies of every generator, sorted descending (each appears twice, as the
    eigenvalues ``+-i omega`` of a real skew-symmetric matrix come in pairs).

    Shape:
        ``(num_heads, num_axes, head_dim)``
    """
    gens = encoding.generators().detach().double()
    eig = torch.linalg.eigvals(gens).imag.abs()
    return eig.sort(dim=-1, descending=True).values


@torch.no_grad()
def commutator_norms(encoding: LieRE) -> Tensor:
    """``||A_a A_b - A_b A_a||_F / (||A_a||_F ||A_b||_F)`` for every head and axis pair.

    Shape:
        ``(num_heads, num_axes, num_axes)`` (symmetric, zero diagonal)
    """
    gens = encoding.generators().detach().double()  # h a d d
    ab = torch.einsum("hxde,hyef->hxydf", gens, gens)
    comm = ab - ab.transpose(1, 2)
    norms = gens.flatten(-2).norm(dim=-1)  # h a
    denom = (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp_min(torch.finfo(torch.float64).tiny)
    return comm.flatten(-2).norm(dim=-1) / denom


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("liere.viz plots need matplotlib: pip install 'liere[viz]'") from err
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spatial_kernel(
    encoding: RotaryEncoding,
    grid: Sequence[int],
    query: Optional[Sequence[int]] = None,
    *,
    reference: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
    path: Optional[str] = None,
) -> Any:
    """Heatmaps of ``spatial_kernel`` over a 2D ``grid`` for the query cell ``query``
    (default: the centre), one panel per head. Returns the matplotlib figure; saves it to
    ``path`` when given. 3-axis encodings: pass ``grid`` with a leading 1 (one frame)."""
    plt = _pyplot()
    grid = tuple(grid)
    spatial = [g for g in grid if g > 1] or [1, 1]
    if len(spatial) != 2:
        raise ValueError(f"plot_spatial_kernel draws 2D grids; got {grid}.")
    positions = grid_positions(*grid, reference=reference)
    if positions.shape[1] != encoding.num_axes:
        raise ValueError(
            f"grid {grid} has {positions.shape[1]} axes but the encoding has {encoding.num_axes}."
        )
    centre = [g // 2 for g in grid] if query is None else list(query)
    index = 0
    for size, c in zip(grid, centre):
        index = index * size + c
    kernel = spatial_kernel(encoding, positions, index).reshape(-1, *spatial)
    heads = list(range(kernel.shape[0])) if heads is None else list(heads)
    fig, axes = plt.subplots(1, len(heads), figsize=(2.6 * len(heads), 2.7), squeeze=False)
    for ax, h in zip(axes[0], heads):
        image = ax.imshow(kernel[h].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        qr, qc = [c for g, c in zip(grid, centre) if g > 1][:2]
        ax.plot([qc], [qr], marker="x", color="k")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(title or f"{type(encoding).__name__}: tr(R(q)^T R(p)) / d", fontsize=10)
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_generator_spectra(encoding: LieRE, *, path: Optional[str] = None) -> Any:
    """Per head and axis: sorted rotation frequencies; and the commutator-norm matrix."""
    plt = _pyplot()
    spectra = generator_spectra(encoding)  # h a d
    comm = commutator_norms(encoding)  # h a a
    h, a, _ = spectra.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for head in range(h):
        for axis in range(a):
            left.plot(spectra[head, axis, ::2].numpy(), alpha=0.7, label=f"h{head} axis {axis}")
    left.set_xlabel("pair (sorted)")
    left.set_ylabel("|omega| (rad per unit position)")
    left.set_title("generator spectra")
    if h * a <= 8:
        left.legend(fontsize=7)
    upper = torch.triu_indices(a, a, 1)
    values = comm[:, upper[0], upper[1]]  # h pairs
    right.bar(range(h), values.mean(-1).numpy() if values.numel() else [0] * h)
    right.set_xlabel("head")
    right.set_ylabel("||[A_a, A_b]|| / (||A_a|| ||A_b||)")
    right.set_title("distance from commuting (0 = RoPE-like)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig

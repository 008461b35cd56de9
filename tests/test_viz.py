import math

import pytest
import torch

from liere import AxialRoPE, LieRE, MixedRoPE, grid_positions
from liere.viz import (
    commutator_norms,
    generator_spectra,
    plot_generator_spectra,
    plot_spatial_kernel,
    spatial_kernel,
)


def test_kernel_is_one_at_the_query_and_bounded():
    enc = LieRE(16, 2, num_heads=3, block_size=8)
    kernel = spatial_kernel(enc, grid_positions(5, 5), 12)
    assert kernel.shape == (3, 25)
    torch.testing.assert_close(kernel[:, 12], torch.ones(3, dtype=torch.float64))
    assert kernel.abs().max() <= 1 + 1e-9


def test_rope_kernel_is_the_cosine_sum():
    enc = AxialRoPE(8, 1, max_freq=1.0, base=10.0)
    positions = torch.arange(6.0).unsqueeze(-1)
    kernel = spatial_kernel(enc, positions, 2)[0]
    freqs = 10.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cos((positions.double() - 2) * freqs).mean(-1)
    torch.testing.assert_close(kernel, expected)


def test_rope_kernel_is_translation_invariant_and_liere_is_not():
    positions = grid_positions(6, 6)
    for enc, invariant in (
        (MixedRoPE(16, 2, num_heads=2), True),
        (LieRE(16, 2, block_size=16), False),
    ):
        a = spatial_kernel(enc, positions, 7).reshape(-1, 6, 6)  # query (1, 1)
        b = spatial_kernel(enc, positions, 14).reshape(-1, 6, 6)  # query (2, 2)
        same = torch.allclose(a[:, :5, :5], b[:, 1:, 1:], atol=1e-9)
        assert same == invariant


def test_commutators_vanish_for_2x2_blocks_only():
    assert commutator_norms(LieRE(16, 2, num_heads=2, block_size=2)).abs().max() < 1e-12
    comm = commutator_norms(LieRE(16, 3, num_heads=2, block_size=8))
    assert comm.shape == (2, 3, 3)
    assert torch.all(comm.diagonal(dim1=-2, dim2=-1) == 0)
    assert comm[:, 0, 1].min() > 1e-3
    torch.testing.assert_close(comm, comm.transpose(1, 2))


def test_spectra_of_2x2_blocks_are_their_angles():
    enc = LieRE(4, 1, block_size=2)
    with torch.no_grad():
        enc.weight.copy_(torch.tensor([[[[0.5], [2.0]]]]))
    spectra = generator_spectra(enc)
    torch.testing.assert_close(
        spectra[0, 0], torch.tensor([2.0, 2.0, 0.5, 0.5], dtype=torch.float64)
    )


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    enc = LieRE(16, 2, num_heads=2, block_size=8)
    path = tmp_path / "kernel.png"
    fig = plot_spatial_kernel(enc, (7, 7), path=str(path))
    assert path.stat().st_size > 1000 and len(fig.axes) >= 2
    path2 = tmp_path / "spectra.png"
    plot_generator_spectra(enc, path=str(path2))
    assert path2.stat().st_size > 1000
    video = LieRE(16, 3)
    plot_spatial_kernel(video, (1, 5, 5), path=str(tmp_path / "video.png"))


def test_plot_errors():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="draws 2D grids"):
        plot_spatial_kernel(LieRE(16, 3), (3, 4, 4))
    with pytest.raises(ValueError, match="has 2 axes but the encoding has 3"):
        plot_spatial_kernel(LieRE(16, 3), (4, 4))
    with pytest.raises(ValueError, match="out of range"):
        spatial_kernel(LieRE(16, 2), grid_positions(2, 2), 4)
    assert math.isfinite(float(commutator_norms(LieRE(8, 1, init="zeros")).sum()))

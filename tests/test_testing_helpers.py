"""liere.testing: each helper passes on correct encodings and fails on broken ones."""

import subprocess
import sys

import pytest
import torch
from conftest import randn
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from liere import AxialRoPE, LieRE, MixedRoPE, RotaryAttention, grid_positions
from liere.testing import (
    assert_orthogonal,
    assert_permutation_equivariant,
    assert_relative,
    assert_uses_all_axes,
    axis_sensitivity,
    orthogonality_error,
    orthogonality_tolerance,
    relative_position_error,
)
from liere.testing import strategies as lst


class Stretch(nn.Module):
    """Broken: rotates, then scales by 1 + eps (not orthogonal)."""

    def __init__(self, inner, eps=1e-3):
        super().__init__()
        self.inner, self.eps, self.head_dim = inner, eps, inner.head_dim

    def forward(self, q, k, positions):
        q, k = self.inner(q, k, positions)
        return q * (1 + self.eps), k * (1 + self.eps)


class DropAxis(nn.Module):
    """Broken: ignores the last coordinate axis."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.head_dim = inner, inner.head_dim

    def forward(self, q, k, positions):
        positions = positions.clone()
        positions[..., -1] = 0
        return self.inner(q, k, positions)


class AbsoluteBias(nn.Module):
    """Broken RoPE: adds a position-dependent vector (absolute, not relative)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.head_dim = inner, inner.head_dim

    def forward(self, q, k, positions):
        q, k = self.inner(q, k, positions)
        bias = positions[..., :1].expand(*positions.shape[:-1], q.shape[-1]).to(q.dtype)
        return q + bias, k


class ForgetsPositions(nn.Module):
    """Broken attention: ignores the positions it is given."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, positions):
        return self.attn(x, torch.zeros_like(positions))


class UsesTokenIndex(nn.Module):
    """Broken attention: rotates by token index instead of the given positions."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, positions):
        index = torch.arange(positions.shape[-2], dtype=positions.dtype).unsqueeze(-1)
        return self.attn(x, index.expand(positions.shape[-2], positions.shape[-1]))


# -- assert_orthogonal ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "enc", [LieRE(16, 2, num_heads=2), AxialRoPE(16), MixedRoPE(16, num_heads=2)]
)
def test_orthogonal_passes_on_real_rotations(enc):
    assert_orthogonal(enc, grid_positions(4, 4))
    assert orthogonality_error(enc, grid_positions(4, 4), dtype=torch.float64) < 1e-12


def test_orthogonal_fails_on_stretch():
    broken = Stretch(LieRE(16, 2))
    with pytest.raises(
        AssertionError, match=r"not orthogonal: inner products changed by 2\.0\d*e-03 .*tolerance"
    ):
        assert_orthogonal(broken, grid_positions(4, 4))


def test_orthogonality_tolerance_formula():
    enc = LieRE(16, 2, num_heads=2)
    pos = grid_positions(3, 3)
    expected = 10 * 16 * torch.finfo(torch.float32).eps * max(1.0, enc.generator_norm(pos))
    assert orthogonality_tolerance(enc, pos, torch.bfloat16) == pytest.approx(expected)
    assert orthogonality_tolerance(enc, pos * 4, torch.float32) > 3 * expected  # scales with norm


def test_generator_norm_bounds_the_true_spectral_norm():
    enc = LieRE(8, 2, num_heads=2, block_size=4).double()
    pos = randn(5, 2, seed=1, dtype=torch.float64)
    gens = torch.einsum("na,hade->hnde", pos, enc.generators().detach())
    true = torch.linalg.matrix_norm(gens, ord=2).max().item()
    assert true <= enc.generator_norm(pos) * (1 + 1e-12)
    rope = MixedRoPE(8, num_heads=2).double()
    angles = torch.einsum("na,hak->hnk", pos, rope.freqs.detach())
    assert rope.generator_norm(pos) >= angles.abs().max().item() * (1 - 1e-12)


# -- assert_relative ------------------------------------------------------------------------


def test_relative_fails_on_absolute_bias():
    broken = AbsoluteBias(AxialRoPE(16)).double()
    pos = grid_positions(3, 3, dtype=torch.float64)
    assert relative_position_error(AxialRoPE(16).double(), pos, [0.3, 0.1]) < 1e-12
    with pytest.raises(
        AssertionError, match=r"not relative: shifting positions by .* changed them by .*tolerance"
    ):
        assert_relative(broken, pos)


def test_relative_with_explicit_shift_and_atol():
    enc = LieRE(16, 2, block_size=16).double()
    pos = grid_positions(3, 3, dtype=torch.float64)
    error = relative_position_error(enc, pos, [1.0, 0.0])
    assert_relative(enc, pos, [1.0, 0.0], atol=2 * error)
    with pytest.raises(AssertionError, match="tolerance 1.000e-09"):
        assert_relative(enc, pos, [1.0, 0.0], atol=1e-9)


# -- assert_uses_all_axes --------------------------------------------------------------------


@pytest.mark.parametrize("enc", [LieRE(16, 3), AxialRoPE(16, 3), MixedRoPE(16, 3)])
def test_uses_all_axes_passes(enc):
    assert_uses_all_axes(enc, randn(8, 3, seed=0))


def test_uses_all_axes_fails_when_an_axis_is_dropped():
    broken = DropAxis(LieRE(16, 3))
    effects = axis_sensitivity(broken, randn(8, 3, seed=0))
    assert effects[0] > 1e-2 and effects[2] == 0.0
    with pytest.raises(AssertionError, match=r"axis 2 does not affect the scores: .* 0\.000e\+00"):
        assert_uses_all_axes(broken, randn(8, 3, seed=0))


# -- assert_permutation_equivariant ------------------------------------------------------------


def rope_attention(prefix=0):
    torch.manual_seed(0)
    return RotaryAttention(
        16, 2, pos_enc=LieRE(8, 2, num_heads=2, block_size=4), num_prefix_tokens=prefix
    )


def test_equivariance_fails_when_attention_forgets_positions():
    broken = ForgetsPositions(rope_attention())
    x, pos = randn(2, 9, 16, seed=1), grid_positions(3, 3)
    with pytest.raises(
        AssertionError,
        match="does not depend on positions: moving positions alone changed it by 0.000e\\+00",
    ):
        assert_permutation_equivariant(broken, x, pos)
    assert_permutation_equivariant(broken, x, pos, require_position_effect=False)


def test_equivariance_fails_when_attention_uses_token_index():
    broken = UsesTokenIndex(rope_attention())
    with pytest.raises(AssertionError, match="not permutation-equivariant: .* tolerance"):
        assert_permutation_equivariant(broken, randn(2, 9, 16, seed=1), grid_positions(3, 3))


def test_equivariance_keeps_prefix_tokens_in_place():
    attn = rope_attention(prefix=2)
    x, pos = randn(2, 11, 16, seed=1), grid_positions(3, 3)
    assert_permutation_equivariant(attn, x, pos, num_prefix_tokens=2)
    # declaring no prefix lets the CLS tokens move without positions: the check must notice
    with pytest.raises(ValueError, match="positions need 11 rows"):
        assert_permutation_equivariant(attn, x, pos, num_prefix_tokens=0)


# -- strategies and imports ----------------------------------------------------------------


@given(lst.positions(kind="per_sample", batch=3))
def test_strategy_per_sample_positions(pos):
    assert pos.dim() == 3 and pos.shape[0] == 3 and 1 <= pos.shape[2] <= 3


@given(lst.positions(2, kind="grid"), lst.head_dims_and_block_sizes(), lst.dtypes())
def test_strategies_fit_encodings(pos, dims, dtype):
    head_dim, block = dims
    assert head_dim % block == 0 and head_dim % 2 == 0
    enc = LieRE(head_dim, 2, block_size=block)
    q = torch.ones(1, 1, pos.shape[0], head_dim, dtype=dtype)
    assert enc(q, q, pos)[0].dtype == dtype


@given(st.data())
def test_strategy_rejects_unknown_kind(data):
    with pytest.raises(ValueError, match="kind must be"):
        data.draw(lst.positions(2, kind="spiral"))


def test_importable_without_pytest_or_hypothesis():
    code = (
        "import sys; sys.modules['pytest'] = None; sys.modules['hypothesis'] = None\n"
        "import liere.testing as t\n"
        "from liere import LieRE, grid_positions\n"
        "t.assert_orthogonal(LieRE(8, 2), grid_positions(2, 2)); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"

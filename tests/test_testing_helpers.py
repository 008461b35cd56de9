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
from liere import functional as F
from liere.testing import (
    assert_orthogonal,
    assert_permutation_equivariant,
    assert_relative,
    assert_uses_all_axes,
    axis_sensitivity,
    orthogonality_error,
    orthogonality_tolerance,
    permutation_equivariance_error,
    relative_position_error,
    relative_tolerance,
)
from liere.testing import strategies as lst


class Wrapper(nn.Module):
    """An encoding's sizes and generator norm, for the helpers' defaults."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.head_dim = inner, inner.head_dim
        self.num_heads = getattr(inner, "num_heads", 1)
        self.generator_norm = inner.generator_norm


class Stretch(Wrapper):
    """Broken: rotates, then scales by 1 + eps (not orthogonal)."""

    def __init__(self, inner, eps=1e-3):
        super().__init__(inner)
        self.eps = eps

    def forward(self, q, k, positions):
        q, k = self.inner(q, k, positions)
        return q * (1 + self.eps), k * (1 + self.eps)


def stretch_for(change):
    """The stretch ``e`` whose inner-product change ``(1 + e)^2 - 1`` is ``change``."""
    return (1 + change) ** 0.5 - 1


class ScaleAxis(Wrapper):
    """Broken for small ``factor``: the last coordinate axis barely counts."""

    def __init__(self, inner, factor):
        super().__init__(inner)
        self.factor = factor

    def forward(self, q, k, positions):
        positions = positions.clone()
        positions[..., -1] *= self.factor
        return self.inner(q, k, positions)


class NaNOut(Wrapper):
    """Broken: a correct encoding whose output has one NaN."""

    def forward(self, q, k, positions):
        q, k = self.inner(q, k, positions)
        q = q.clone()
        q[0, 0, -1, 0] = float("nan")
        return q, k


class DropAxis(nn.Module):
    """Broken: ignores the last coordinate axis."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.head_dim = inner, inner.head_dim

    def forward(self, q, k, positions):
        positions = positions.clone()
        positions[..., -1] = 0
        return self.inner(q, k, positions)


class AbsoluteBias(Wrapper):
    """Broken RoPE: adds a position-dependent vector (absolute, not relative)."""

    def __init__(self, inner, scale=1.0):
        super().__init__(inner)
        self.scale = scale

    def forward(self, q, k, positions):
        q, k = self.inner(q, k, positions)
        bias = positions[..., :1].expand(*positions.shape[:-1], q.shape[-1]).to(q.dtype)
        return q + self.scale * bias, k


class ForgetsPositions(nn.Module):
    """Broken attention: ignores the positions it is given."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, positions):
        return self.attn(x, torch.zeros_like(positions))


class UsesTokenIndex(nn.Module):
    """Broken attention: rotates by token index instead of the given positions (``blend`` of
    it added to the positions; None: the index alone)."""

    def __init__(self, attn, blend=None):
        super().__init__()
        self.attn, self.blend = attn, blend

    def forward(self, x, positions):
        index = torch.arange(positions.shape[-2], dtype=positions.dtype).unsqueeze(-1)
        index = index.expand(positions.shape[-2], positions.shape[-1])
        return self.attn(x, index if self.blend is None else positions + self.blend * index)


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
    eps = torch.finfo(torch.float32).eps
    norm = enc.generator_norm(pos)
    expected = 10 * 16 * eps + 4 * eps * max(1.0, norm)
    assert orthogonality_tolerance(enc, pos, torch.bfloat16) == pytest.approx(expected)
    assert orthogonality_tolerance(enc, pos, torch.float32) == pytest.approx(expected)
    eps64 = torch.finfo(torch.float64).eps
    expected64 = 10 * 16 * eps64 + 4 * eps64 * max(1.0, norm)
    assert orthogonality_tolerance(enc, pos, torch.float64) == pytest.approx(expected64)


def test_tolerance_at_large_positions_agrees_with_the_library_bound():
    """At positions of 1e4 the tolerance is twice the library's own bound (the figure its
    warning names) plus the d-term, not a meaningless multiple of it."""
    torch.manual_seed(0)
    enc = LieRE(64, 2)
    pos = grid_positions(4, 4) * 1e4
    norm = enc.generator_norm(pos)
    bound = F.rotation_error_bound(norm, torch.float32)
    tol = orthogonality_tolerance(enc, pos, torch.float32)
    assert tol == pytest.approx(10 * 64 * torch.finfo(torch.float32).eps + 2 * bound)
    assert tol < 1.0
    with pytest.warns(RuntimeWarning, match="error up to about") as record:
        assert_orthogonal(enc, pos)
    warned = float(str(record[0].message).split("error up to about ")[1].split(")")[0])
    assert 0.5 < bound / warned < 2.0  # the same bound, up to how the norm is estimated
    with pytest.warns(RuntimeWarning), pytest.raises(AssertionError, match="not orthogonal"):
        assert_orthogonal(Stretch(enc, eps=stretch_for(1.5 * tol)), pos)


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


# -- just past the tolerance, float32 and float64 ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_orthogonal_just_past_its_tolerance(dtype, per_sample):
    torch.manual_seed(0)
    enc = LieRE(16, 2, num_heads=2)
    pos = randn(3, 9, 2, seed=2) if per_sample else grid_positions(3, 3)
    tol = orthogonality_tolerance(enc, pos, dtype)
    assert_orthogonal(enc, pos, dtype=dtype)
    assert_orthogonal(Stretch(enc, eps=stretch_for(0.5 * tol)), pos, dtype=dtype)
    with pytest.raises(AssertionError, match="not orthogonal"):
        assert_orthogonal(Stretch(enc, eps=stretch_for(1.5 * tol)), pos, dtype=dtype)


def test_orthogonality_of_per_sample_positions_is_judged_per_sample():
    """A correct LieRE with per-sample positions has no error (the old Gram over the batch
    mixed samples with different rotations and read 0.76-1.0)."""
    torch.manual_seed(0)
    enc = LieRE(16, 2, num_heads=2)
    pos = randn(4, 9, 2, seed=3)
    assert orthogonality_error(enc, pos, dtype=torch.float64) < 1e-12
    assert_orthogonal(enc, pos)


def calibrated(make, measure, target, probe=1e-3):
    """``make(scale)`` whose ``measure`` is ``target`` (to 10%, checked): the measures here grow
    about linearly in the scale, so a few proportional updates converge."""
    scale = probe
    for _ in range(4):
        scale *= target / measure(make(scale))
    broken = make(scale)
    assert measure(broken) == pytest.approx(target, rel=0.1)
    return broken


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_just_past_its_tolerance(dtype):
    enc = AxialRoPE(16)
    pos = grid_positions(3, 3, dtype=dtype)
    shift = torch.tensor([0.3, 0.1], dtype=dtype)
    tol = relative_tolerance(enc, pos, shift, dtype=dtype)

    def measure(module):
        return relative_position_error(module, pos, shift, dtype=dtype)

    assert_relative(enc, pos, shift, dtype=dtype)
    below = calibrated(lambda c: AbsoluteBias(enc, c), measure, 0.5 * tol)
    assert_relative(below, pos, shift, dtype=dtype)
    above = calibrated(lambda c: AbsoluteBias(enc, c), measure, 1.5 * tol)
    with pytest.raises(AssertionError, match="not relative"):
        assert_relative(above, pos, shift, dtype=dtype)


@pytest.mark.parametrize(
    "enc",
    [
        AxialRoPE(16, 2),
        MixedRoPE(16, 2, num_heads=2),
        LieRE(16, 2, num_heads=2, block_size=2),
        LieRE(16, 1, num_heads=2, block_size=8),
        LieRE(16, 1, block_size=16),
    ],
    ids=["axial", "mixed", "liere2", "liere8-1d", "dense-1d"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_passes_exactly_relative_encodings_at_float32_positions(enc, dtype):
    """The README's claim, at float32 positions (the library's default) and both score
    dtypes: shifting float32 positions rounds them, and the tolerance accounts for it."""
    sizes = (6, 6) if enc.num_axes == 2 else (12,)
    assert_relative(enc, grid_positions(*sizes), dtype=dtype)
    assert_relative(enc, randn(2, 10, enc.num_axes, seed=4), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uses_all_axes_just_past_its_threshold(dtype):
    torch.manual_seed(0)
    enc = LieRE(16, 2, num_heads=2)
    pos = randn(8, 2, seed=0, dtype=dtype)
    min_effect = 1e-3

    def measure(module):
        return axis_sensitivity(module, pos, dtype=dtype)[-1]

    assert_uses_all_axes(enc, pos, dtype=dtype)
    weak = calibrated(lambda c: ScaleAxis(enc, c), measure, 0.5 * min_effect)
    with pytest.raises(AssertionError, match="axis 1 does not affect the scores"):
        assert_uses_all_axes(weak, pos, min_effect=min_effect, dtype=dtype)
    strong = calibrated(lambda c: ScaleAxis(enc, c), measure, 1.5 * min_effect)
    assert_uses_all_axes(strong, pos, min_effect=min_effect, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equivariance_just_past_its_tolerance(dtype):
    attn = rope_attention().to(dtype)
    x, pos = randn(2, 9, 16, seed=1, dtype=dtype), grid_positions(3, 3, dtype=dtype)
    tol = 1000 * torch.finfo(dtype).eps

    def measure(module):
        return permutation_equivariance_error(module, x, pos)[0]

    assert_permutation_equivariant(attn, x, pos)
    below = calibrated(lambda c: UsesTokenIndex(attn, c), measure, 0.5 * tol)
    assert_permutation_equivariant(below, x, pos)
    above = calibrated(lambda c: UsesTokenIndex(attn, c), measure, 1.5 * tol)
    with pytest.raises(AssertionError, match="not permutation-equivariant"):
        assert_permutation_equivariant(above, x, pos)


# -- NaN and Inf fail every assertion ----------------------------------------------------------


def test_nan_fails_every_assertion():
    torch.manual_seed(0)
    broken = NaNOut(LieRE(16, 2, num_heads=2))
    pos = grid_positions(3, 3)
    with pytest.raises(AssertionError, match="NaN or Inf"):
        assert_orthogonal(broken, pos)
    with pytest.raises(AssertionError, match="NaN or Inf"):
        assert_orthogonal(broken, pos, atol=1.0)
    with pytest.raises(AssertionError, match="NaN or Inf"):
        assert_relative(broken, pos)
    with pytest.raises(AssertionError, match="NaN or Inf"):
        assert_uses_all_axes(broken, pos)

    class NaNAttention(nn.Module):
        def forward(self, x, positions):
            out = rope_attention()(x, positions)
            return out.masked_fill(out > 1e9, 0) * float("inf")

    with pytest.raises(AssertionError, match="NaN or Inf"):
        assert_permutation_equivariant(NaNAttention(), randn(2, 9, 16, seed=1), pos)


def test_helpers_reject_positions_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"positions of shape \(tokens, axes\) or"):
        assert_orthogonal(LieRE(16, 2), torch.zeros(2, 3, 4, 2))


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

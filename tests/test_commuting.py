"""The commuting family (ComRoPE AP/LD, Cayley-STRING) and coordinate augmentation: exactly
relative, equal to the matrix exponential of their dense generators, orthogonal, the shared
protocol; augment_positions follows DINOv3's semantics."""

import math

import pytest
import torch
from conftest import randn
from hypothesis import given
from hypothesis import strategies as st

from liere import CayleySTRING, ComRoPE, augment_positions, grid_positions
from liere import functional as F
from liere.models import VisionTransformer
from liere.testing import assert_orthogonal, assert_relative, relative_position_error


def make(name, d=16, a=2, h=2, **kwargs):
    torch.manual_seed(0)
    if name == "comrope-ap":
        return ComRoPE(d, a, num_heads=h, block_size=4, variant="ap", **kwargs)
    if name == "comrope-ld":
        return ComRoPE(d, a, num_heads=h, block_size=4, variant="ld", **kwargs)
    return CayleySTRING(d, a, num_heads=h, **kwargs)


NAMES = ["comrope-ap", "comrope-ld", "string-cayley"]


def dims_for(a):
    return 24 if a == 3 else 16  # ap needs head_dim divisible by num_axes * block_size


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("axes", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_depend_only_on_relative_position(name, axes, dtype):
    enc = make(name, d=dims_for(axes), a=axes)
    for positions in (randn(12, axes, seed=1), randn(2, 12, axes, seed=2)):
        assert_relative(enc, positions, dtype=dtype)  # float32 positions, both score dtypes


@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 4.0))
def test_relative_for_random_positions_and_shifts(seed, scale):
    for name in NAMES:
        enc = make(name).double()
        pos = randn(9, 2, seed=seed, dtype=torch.float64) * scale
        shift = randn(2, seed=seed + 1, dtype=torch.float64) * scale
        assert relative_position_error(enc, pos, shift) < 1e-12


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("axes", [1, 2, 3])
def test_matches_matrix_exp_of_the_dense_generators(name, axes):
    enc = make(name, d=dims_for(axes), a=axes).double()
    pos = randn(2, 7, axes, seed=3, dtype=torch.float64) * 2
    q = randn(2, 2, 7, enc.head_dim, seed=4, dtype=torch.float64)
    generators = enc.generators().detach()  # (h, a, d, d)
    assert torch.equal(generators, -generators.mT)
    gen = torch.einsum("bna,hade->bhnde", pos, generators)
    expected = torch.einsum("bhnde,bhne->bhnd", F.expm_skew_reference(gen), q)
    torch.testing.assert_close(enc(q, q, pos)[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(enc.rotation_matrices(pos[0]), F.expm_skew_reference(gen[0]))


@pytest.mark.parametrize("name", NAMES)
def test_generators_commute(name):
    g = make(name, d=24, a=3).double().generators().detach()
    for a in range(3):
        for b in range(3):
            torch.testing.assert_close(g[:, a] @ g[:, b], g[:, b] @ g[:, a], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_orthogonal_up_to_4x_the_training_range(name):
    enc = make(name)
    for scale in (1.0, 4.0):
        assert_orthogonal(enc, grid_positions(6, 6) * scale)
        assert_orthogonal(enc, randn(3, 8, 2, seed=5) * scale)


@pytest.mark.parametrize("name", NAMES)
def test_shared_protocol(name):
    enc = make(name)
    q, k = randn(2, 2, 10, 16, seed=1), randn(2, 2, 10, 16, seed=2)
    pos = grid_positions(3, 3)
    q_out, k_out = enc(q, k, pos, num_prefix_tokens=1)
    torch.testing.assert_close(q_out[:, :, :1], q[:, :, :1], atol=0, rtol=0)
    torch.testing.assert_close(enc.rotate(q, pos, num_prefix_tokens=1), q_out)
    expected = enc(q, k, pos, num_prefix_tokens=1)
    enc.freeze(pos)
    assert enc.is_frozen
    for out, ref in zip(enc(q, k, pos, num_prefix_tokens=1), expected):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    enc.unfreeze()
    # bf16 in, bf16 out, computed in float32 with autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = enc(q.bfloat16(), k.bfloat16(), pos, num_prefix_tokens=1)[0]
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected[0], atol=3e-2, rtol=3e-2)
    assert set(enc.state_dict()) == {n for n, _ in enc.named_parameters()}
    assert "head_dim=16" in repr(enc)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_float64(name):
    enc = make(name, d=8, a=2, h=1).double()
    pos = randn(3, 2, seed=6, dtype=torch.float64).requires_grad_()
    q = randn(1, 1, 3, 8, seed=7, dtype=torch.float64).requires_grad_()
    params = tuple(enc.parameters())

    def fn(q, pos, *params):
        return enc(q, q, pos)[0]

    assert torch.autograd.gradcheck(fn, (q, pos, *params))


@pytest.mark.parametrize("name", NAMES)
def test_meta_init(name):
    with torch.device("meta"):
        enc = make(name)
    enc = enc.to_empty(device="cpu")
    enc.reset_parameters()
    assert_relative(enc, grid_positions(3, 3))


def test_comrope_ap_turns_each_block_group_with_one_axis():
    enc = ComRoPE(16, 2, block_size=4, variant="ap")
    bases = enc.bases().detach()  # (1, 2, 4, 4, 4): blocks 0-1 axis 0, blocks 2-3 axis 1
    assert enc.axis_of_block() == [0, 0, 1, 1]
    assert bases[:, 0, 2:].abs().sum() == 0 and bases[:, 1, :2].abs().sum() == 0
    assert bases[:, 0, :2].abs().sum() > 0 and bases[:, 1, 2:].abs().sum() > 0


def test_comrope_ld_scales_one_block_per_axis():
    enc = ComRoPE(16, 2, num_heads=2, block_size=4, variant="ld")
    bases = enc.bases().detach()
    ratio = bases[:, 1] / bases[:, 0]  # theta[1, j] / theta[0, j] on every entry of block j
    expected = (enc.theta[1] / enc.theta[0]).detach().view(1, 4, 1, 1)
    mask = bases[:, 0].abs() > 1e-6
    torch.testing.assert_close(ratio[mask], expected.expand_as(ratio)[mask])
    assert enc.theta.shape == (2, 4)  # shared by the heads


def test_cayley_basis_is_orthogonal_and_identity_at_zero():
    enc = CayleySTRING(16, 2, num_heads=3).double()
    basis = enc.basis().detach()
    torch.testing.assert_close(
        basis.mT @ basis, torch.eye(16, dtype=torch.float64).expand(3, -1, -1)
    )
    zero = CayleySTRING(16, 2, init_std=0.0)
    assert torch.equal(zero.basis().detach(), torch.eye(16).unsqueeze(0))


def test_configuration_errors():
    with pytest.raises(ValueError, match=r"variant must be 'ap' or 'ld'; got 'xy'"):
        ComRoPE(16, 2, variant="xy")
    with pytest.raises(ValueError, match=r"divisible by num_axes \* block_size = 24"):
        ComRoPE(16, 3, block_size=8, variant="ap")
    with pytest.raises(ValueError, match=r"num_axes \* block_size = 16.*block_size dividing 12"):
        ComRoPE(24, 2, block_size=8, variant="ap")
    ComRoPE(24, 2, block_size=8, variant="ld")  # ld has no per-axis groups
    with pytest.raises(ValueError, match="block_size must divide head_dim"):
        ComRoPE(16, 2, block_size=6)
    with pytest.raises(ValueError, match="even head_dim"):
        CayleySTRING(15, 2)


def test_vit_builds_every_new_encoding():
    x = randn(2, 3, 16, 16)
    for name in NAMES:
        torch.manual_seed(0)
        model = VisionTransformer(
            16, 4, 3, dim=32, depth=1, num_heads=2, pos_enc=name, block_size=4
        )
        assert model(x).shape == (2, 3)
        assert model(randn(1, 3, 24, 24)).shape == (1, 3)  # other sizes


# -- augment_positions -----------------------------------------------------------------------


def test_augment_defaults_are_the_identity():
    pos = grid_positions(4, 4)
    assert augment_positions(pos) is pos


def test_augment_shift_jitter_rescale_semantics():
    pos = grid_positions(5, 5, dtype=torch.float64)  # centre 0.5 on both axes
    gen = torch.Generator().manual_seed(0)
    shifted = augment_positions(pos, shift=0.2, generator=gen)
    offset = shifted - pos
    assert torch.allclose(offset, offset[:1].expand_as(offset))  # one shift per axis
    assert bool((offset[0].abs() <= 0.2).all()) and not torch.equal(offset[0], torch.zeros(2))
    jittered = augment_positions(pos, jitter=2.0, generator=gen)
    factor = (jittered - 0.5)[1:] / (pos - 0.5)[1:]
    finite = (pos - 0.5)[1:].abs() > 1e-9
    per_axis = [factor[:, a][finite[:, a]] for a in range(2)]
    for values in per_axis:  # one factor per axis, in [1/2, 2], about the centre
        assert torch.allclose(values, values[:1].expand_as(values))
        assert 0.5 <= float(values[0]) <= 2.0
    rescaled = augment_positions(pos, rescale=3.0, generator=gen)
    factor = (rescaled - 0.5)[1:][finite] / (pos - 0.5)[1:][finite]
    assert torch.allclose(factor, factor[:1].expand_as(factor))  # the same for both axes
    assert 1 / 3 <= float(factor[0]) <= 3.0


def test_augment_draws_are_log_uniform():
    pos = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    logs = [
        math.log(float(augment_positions(pos, jitter=4.0, generator=gen)[1, 0] - 0.5) / 0.5)
        for _ in range(2000)
    ]
    logs_t = torch.tensor(logs)
    assert float(logs_t.abs().max()) <= math.log(4.0) + 1e-9
    assert abs(float(logs_t.mean())) < 0.1  # symmetric in log
    assert abs(float(logs_t.std()) - math.log(4.0) / math.sqrt(3)) < 0.05  # uniform in log


def test_augment_per_sample_draws_differ_and_keep_shape_and_dtype():
    pos = grid_positions(3, 3).expand(4, 9, 2)
    gen = torch.Generator().manual_seed(0)
    out = augment_positions(pos, shift=0.5, jitter=1.5, rescale=1.5, generator=gen)
    assert out.shape == pos.shape and out.dtype == pos.dtype
    assert not torch.allclose(out[0], out[1])
    again = augment_positions(
        pos, shift=0.5, jitter=1.5, rescale=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, again)


def test_augment_errors():
    with pytest.raises(ValueError, match=r"jitter must be a finite number >= 1"):
        augment_positions(grid_positions(2, 2), jitter=0.5)
    with pytest.raises(ValueError, match=r"shift must be a finite number >= 0"):
        augment_positions(grid_positions(2, 2), shift=-1.0)
    with pytest.raises(ValueError, match=r"positions of shape \(tokens, axes\)"):
        augment_positions(torch.zeros(4))


def test_vit_position_augment_in_training_only():
    torch.manual_seed(0)
    model = VisionTransformer(
        16,
        4,
        3,
        dim=32,
        depth=1,
        num_heads=2,
        pos_enc="liere",
        block_size=4,
        position_augment=dict(shift=0.2, jitter=1.3, rescale=1.3),
    )
    plain = VisionTransformer(16, 4, 3, dim=32, depth=1, num_heads=2, pos_enc="liere", block_size=4)
    plain.load_state_dict(model.state_dict())
    x = randn(2, 3, 16, 16)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)  # identity in eval
    model.train()
    plain.train()
    assert not torch.allclose(model(x), plain(x))
    with pytest.raises(ValueError, match="position_augment takes shift, jitter and rescale"):
        VisionTransformer(16, 4, 3, dim=32, depth=1, num_heads=2, position_augment=dict(flip=1))

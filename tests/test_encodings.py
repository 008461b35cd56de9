import math

import pytest
import torch
from conftest import randn
from hypothesis import given
from hypothesis import strategies as st

from liere import AxialRoPE, LieRE, MixedRoPE, grid_positions
from liere.functional import expm_skew_reference
from liere.testing import (
    assert_orthogonal,
    assert_relative,
    orthogonality_tolerance,
    relative_position_error,
)
from liere.testing import strategies as lst

ENCODINGS = {
    "liere8": lambda d, a, h: LieRE(d, a, num_heads=h, block_size=8),
    "liere-dense": lambda d, a, h: LieRE(d, a, num_heads=h, block_size=d),
    "liere2": lambda d, a, h: LieRE(d, a, num_heads=h, block_size=2),
    "liere4-shared": lambda d, a, h: LieRE(d, a, num_heads=1, block_size=4),
    "axial": lambda d, a, h: AxialRoPE(d, a),
    "mixed": lambda d, a, h: MixedRoPE(d, a, num_heads=h),
}


def dense_reference(enc: LieRE, positions: torch.Tensor) -> torch.Tensor:
    """The contract's semantics in float64: expm(sum_a p_a A_a) with dense generators."""
    gens = enc.generators().detach().double()  # h a d d
    return expm_skew_reference(torch.einsum("na,hade->hnde", positions.double(), gens))


@pytest.fixture(params=sorted(ENCODINGS))
def encoding_name(request):
    return request.param


def make(name, d=16, a=2, h=2, seed=0):
    torch.manual_seed(seed)
    return ENCODINGS[name](d, a, h)


# -- contract semantics -------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [2, 4, 8, 16])
@pytest.mark.parametrize("num_axes", [1, 2, 3])
def test_liere_matches_dense_matrix_exponential(block_size, num_axes):
    torch.manual_seed(block_size + num_axes)
    enc = LieRE(16, num_axes, num_heads=3, block_size=block_size)
    positions = randn(7, num_axes, seed=1).abs()
    q, k = randn(2, 3, 7, 16, seed=2), randn(2, 3, 7, 16, seed=3)
    q_out, k_out = enc(q, k, positions)
    rot = dense_reference(enc, positions)  # h n d d
    norm = enc.generator_norm(positions)
    tol = 10 * 16 * torch.finfo(torch.float32).eps * max(1.0, norm) * q.abs().max().item()
    torch.testing.assert_close(
        q_out.double(), torch.einsum("hnde,bhne->bhnd", rot, q.double()), atol=tol, rtol=0
    )
    torch.testing.assert_close(
        k_out.double(), torch.einsum("hnde,bhne->bhnd", rot, k.double()), atol=tol, rtol=0
    )


def test_rotation_matrices_match_reference():
    torch.manual_seed(0)
    enc = LieRE(8, 2, num_heads=2, block_size=4)
    positions = grid_positions(3, 3, dtype=torch.float64)
    torch.testing.assert_close(enc.rotation_matrices(positions), dense_reference(enc, positions))


def test_generators_are_exactly_skew_and_block_diagonal():
    enc = LieRE(16, 3, num_heads=2, block_size=4)
    gens = enc.generators()
    assert gens.shape == (2, 3, 16, 16)
    assert torch.equal(gens, -gens.mT)
    mask = torch.block_diag(*[torch.ones(4, 4)] * 4).bool()
    assert torch.all(gens[..., ~mask] == 0)
    assert torch.count_nonzero(gens[..., mask]) == 2 * 3 * 4 * 12  # U[0, 2pi) entries are > 0


def test_paper_initialisation():
    torch.manual_seed(0)
    enc = LieRE(64, 2, num_heads=4, block_size=8)
    assert enc.weight.shape == (4, 2, 8, 28)
    assert 0 <= enc.weight.min() and enc.weight.max() < 2 * math.pi
    # parameter count: axes x heads x (d / b) x b(b-1)/2
    assert enc.weight.numel() == 2 * 4 * (64 // 8) * 8 * 7 // 2
    assert torch.all(LieRE(8, init="zeros").weight == 0)
    assert LieRE(8, init="normal", init_scale=0.1).weight.std() < 0.5


# -- properties -----------------------------------------------------------------------------


@given(
    lst.head_dims_and_block_sizes(max_head_dim=16),
    st.integers(1, 3),
    st.integers(1, 3),
    lst.float_dtypes(),
    st.data(),
)
def test_liere_rotations_are_orthogonal(dims, num_axes, heads, dtype, data):
    head_dim, block = dims
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    enc = LieRE(head_dim, num_axes, num_heads=heads, block_size=block)
    positions = data.draw(lst.positions(num_axes, kind="irregular", scale=2.0, dtype=dtype))
    assert_orthogonal(enc, positions, dtype=dtype)


def test_each_encoding_orthogonal_up_to_4x_training_range(encoding_name):
    enc = make(encoding_name, d=32, a=2, h=2)
    assert_orthogonal(enc, grid_positions(8, 8, reference=2))  # spans [0, 7]


def test_rotation_matrices_are_special_orthogonal(encoding_name):
    enc = make(encoding_name, d=16, a=2, h=2)
    rot = enc.rotation_matrices(grid_positions(4, 4, dtype=torch.float64))
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(rot.mT @ rot, eye.expand_as(rot), atol=1e-10, rtol=0)
    det = torch.linalg.det(rot)
    torch.testing.assert_close(det, torch.ones_like(det), atol=1e-10, rtol=0)


def test_norms_are_kept(encoding_name):
    enc = make(encoding_name, d=16, a=3, h=2)
    q, k = randn(2, 2, 27, 16, seed=1), randn(2, 2, 27, 16, seed=2)
    q_out, k_out = enc(q, k, grid_positions(3, 3, 3))
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(k_out.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=0)


def test_identity_at_position_zero(encoding_name):
    enc = make(encoding_name)
    q, k = randn(2, 2, 5, 16, seed=1), randn(2, 2, 5, 16, seed=2)
    q_out, k_out = enc(q, k, torch.zeros(5, 2))
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


@pytest.mark.parametrize(
    "name, num_axes",
    [
        ("liere8", 1),
        ("liere-dense", 1),
        ("liere2", 2),
        ("liere2", 3),
        ("axial", 1),
        ("axial", 2),
        ("axial", 3),
        ("mixed", 2),
        ("mixed", 3),
    ],
)
def test_scores_depend_only_on_relative_position(name, num_axes):
    enc = make(name, d=16, a=num_axes, h=2).double()
    positions = randn(10, num_axes, seed=4, dtype=torch.float64)
    assert_relative(enc, positions)


def test_one_axis_liere_composes():
    """1D: R(s) R(t) = R(s + t) since the generator commutes with itself."""
    enc = LieRE(16, 1, num_heads=2, block_size=16).double()
    s, t = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[1.1]], dtype=torch.float64)
    product = enc.rotation_matrices(s) @ enc.rotation_matrices(t)
    torch.testing.assert_close(product, enc.rotation_matrices(s + t), atol=1e-11, rtol=0)


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_2d_liere_with_large_blocks_is_not_translation_invariant(block_size):
    torch.manual_seed(0)
    enc = LieRE(16, 2, num_heads=2, block_size=block_size).double()
    positions = grid_positions(4, 4, dtype=torch.float64)
    error = relative_position_error(enc, positions, [0.5, -0.25])
    assert error > 0.05  # absolute position is encoded too: that is LieRE's extra capacity
    with pytest.raises(AssertionError, match="not relative"):
        assert_relative(enc, positions)


def test_liere_block2_equals_mixed_rope_with_matching_frequencies():
    liere = LieRE(16, 2, num_heads=3, block_size=2)
    mixed = MixedRoPE(16, 2, num_heads=3)
    with torch.no_grad():
        mixed.freqs.copy_(-liere.weight[..., 0])
    q, k = randn(2, 3, 9, 16, seed=1), randn(2, 3, 9, 16, seed=2)
    positions = grid_positions(3, 3)
    for a, b in zip(liere(q, k, positions), mixed(q, k, positions)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_liere_block2_rope_path_matches_exponential_path():
    enc = LieRE(8, 2, num_heads=2, block_size=2).double()
    positions = randn(6, 2, seed=1, dtype=torch.float64)
    torch.testing.assert_close(enc.rotation_matrices(positions), dense_reference(enc, positions))


def test_axial_rope_pair_layout_and_leftover():
    enc = AxialRoPE(14, 3)  # 7 pairs: 2 per axis, 1 left unrotated
    table = enc.frequencies()[0]
    assert table.shape == (3, 7)
    assert torch.count_nonzero(table, dim=0).tolist() == [1, 1, 1, 1, 1, 1, 0]
    assert [int(table[:, j].nonzero()) for j in range(6)] == [0, 0, 1, 1, 2, 2]
    q = randn(1, 1, 4, 14, seed=0)
    q_out, _ = enc(q, q, randn(4, 3, seed=1))
    assert torch.equal(q_out[..., 12:], q[..., 12:])  # the unrotated pair
    assert "unrotated_pairs=1" in repr(enc)


def test_axial_rope_1d_is_standard_rope():
    enc = AxialRoPE(8, 1, max_freq=1.0, base=10000.0)
    positions = torch.arange(6, dtype=torch.float32).unsqueeze(-1)
    q = randn(1, 1, 6, 8, seed=0)
    out, _ = enc(q, q, positions)
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    angles = positions.double() * freqs  # n k
    x = q.double().unflatten(-1, (4, 2))
    expected = torch.stack(
        (
            x[..., 0] * angles.cos() - x[..., 1] * angles.sin(),
            x[..., 0] * angles.sin() + x[..., 1] * angles.cos(),
        ),
        -1,
    ).flatten(-2)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_axial_rope_ignores_other_axes():
    enc = AxialRoPE(8, 2)
    q = randn(1, 1, 1, 8, seed=0)
    out_a, _ = enc(q, q, torch.tensor([[0.3, 0.0]]))
    out_b, _ = enc(q, q, torch.tensor([[0.3, 0.9]]))
    assert torch.equal(out_a[..., :4], out_b[..., :4])  # first 2 pairs follow axis 0 only
    assert not torch.allclose(out_a[..., 4:], out_b[..., 4:])


def test_per_sample_positions_equal_separate_calls(encoding_name):
    enc = make(encoding_name)
    q, k = randn(3, 2, 6, 16, seed=1), randn(3, 2, 6, 16, seed=2)
    positions = randn(3, 6, 2, seed=3)
    q_out, k_out = enc(q, k, positions)
    # one squaring count serves the whole batch, so results differ at rounding level only
    tol = orthogonality_tolerance(enc, positions, torch.float32) * q.abs().max().item()
    for i in range(3):
        q_i, k_i = enc(q[i : i + 1], k[i : i + 1], positions[i])
        torch.testing.assert_close(q_out[i : i + 1], q_i, atol=tol, rtol=0)
        torch.testing.assert_close(k_out[i : i + 1], k_i, atol=tol, rtol=0)


def test_shared_heads_rotate_every_head_identically(encoding_name):
    enc = make(encoding_name, h=1)
    q = randn(1, 1, 5, 16, seed=1).expand(1, 4, 5, 16)
    q_out, _ = enc(q, q, grid_positions(5, 1))
    for h in range(1, 4):
        assert torch.equal(q_out[:, h], q_out[:, 0])


def test_gqa_head_counts_allowed_when_shared():
    enc = LieRE(8, 2, num_heads=1, block_size=4)
    q_out, k_out = enc(randn(2, 6, 4, 8, seed=0), randn(2, 2, 4, 8, seed=1), grid_positions(2, 2))
    assert q_out.shape == (2, 6, 4, 8) and k_out.shape == (2, 2, 4, 8)


def test_values_are_not_touched_and_inputs_not_modified(encoding_name):
    enc = make(encoding_name)
    q, k = randn(1, 2, 4, 16, seed=1), randn(1, 2, 4, 16, seed=2)
    q0, k0 = q.clone(), k.clone()
    enc(q, k, grid_positions(2, 2))
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_non_contiguous_inputs(encoding_name):
    enc = make(encoding_name)
    q = randn(1, 4, 2, 16, seed=1).transpose(1, 2)  # (1, 2, 4, 16), non-contiguous
    k = randn(1, 4, 2, 16, seed=2).transpose(1, 2)
    positions = randn(2, 4, seed=3).mT  # (4, 2), non-contiguous
    out = enc(q, k, positions)
    ref = enc(q.contiguous(), k.contiguous(), positions.contiguous())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# -- dtypes and autocast --------------------------------------------------------------------


def test_half_inputs_keep_dtype_and_match_float32(encoding_name, half_dtype):
    enc = make(encoding_name)
    q, k = randn(2, 2, 9, 16, seed=1), randn(2, 2, 9, 16, seed=2)
    positions = grid_positions(3, 3)
    ref_q, ref_k = enc(q, k, positions)
    q_out, k_out = enc(q.to(half_dtype), k.to(half_dtype), positions)
    assert q_out.dtype == half_dtype and k_out.dtype == half_dtype
    tol = 4 * torch.finfo(half_dtype).eps * q.abs().max().item()
    torch.testing.assert_close(q_out.float(), ref_q, atol=tol, rtol=0)
    torch.testing.assert_close(k_out.float(), ref_k, atol=tol, rtol=0)


def test_float64_inputs_compute_in_float64():
    enc = LieRE(16, 2, num_heads=2, block_size=8)
    positions = grid_positions(3, 3, dtype=torch.float64)
    q = randn(1, 2, 9, 16, seed=1, dtype=torch.float64)
    q_out, _ = enc(q, q, positions)
    assert q_out.dtype == torch.float64
    expected = torch.einsum("hnde,bhne->bhnd", dense_reference(enc, positions), q)
    torch.testing.assert_close(q_out, expected, atol=1e-12, rtol=0)


def test_module_cast_to_bfloat16_still_rotates_in_float32():
    enc = LieRE(16, 2, block_size=8).to(torch.bfloat16)
    q = randn(1, 1, 4, 16, seed=0, dtype=torch.bfloat16)
    q_out, _ = enc(q, q, grid_positions(2, 2))
    torch.testing.assert_close(
        q_out.float().norm(dim=-1), q.float().norm(dim=-1), rtol=2e-2, atol=0
    )


def test_correct_under_autocast(encoding_name):
    enc = make(encoding_name)
    q, k = randn(2, 2, 9, 16, seed=1), randn(2, 2, 9, 16, seed=2)
    positions = grid_positions(3, 3)
    ref_q, _ = enc(q, k, positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_out, k_out = enc(q, k, positions)
    assert q_out.dtype == torch.float32  # float32 in, float32 out: no silent bf16 rounding
    torch.testing.assert_close(q_out, ref_q, atol=1e-5, rtol=0)


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["liere8", "liere2", "mixed", "liere4-shared"])
def test_gradcheck_float64(name):
    torch.manual_seed(0)
    enc = ENCODINGS[name](8, 2, 2).double()
    if name == "liere8":
        enc = LieRE(8, 2, num_heads=2, block_size=4).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(0.5)
    q = randn(1, 2, 3, 8, seed=1, dtype=torch.float64).requires_grad_(True)
    k = randn(1, 2, 3, 8, seed=2, dtype=torch.float64).requires_grad_(True)
    positions = randn(3, 2, seed=3, dtype=torch.float64).requires_grad_(True)
    params = list(enc.parameters())

    def fn(q, k, positions, *flat):
        with torch.no_grad():
            for p, v in zip(params, flat):
                p.copy_(v)
        return torch.func.functional_call(
            enc, dict(zip([n for n, _ in enc.named_parameters()], flat)), (q, k, positions)
        )

    inputs = (q, k, positions, *[p.detach().clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(fn, inputs)


def test_parameters_receive_gradients(encoding_name):
    enc = make(encoding_name)
    if encoding_name == "axial":
        assert list(enc.parameters()) == [] and enc.state_dict() == {}
        return
    q, k = randn(2, 2, 9, 16, seed=1), randn(2, 2, 9, 16, seed=2)
    q_out, k_out = enc(q, k, grid_positions(3, 3))
    (q_out * k_out).sum().backward()
    for p in enc.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# -- errors ---------------------------------------------------------------------------------


def test_constructor_errors():
    with pytest.raises(
        ValueError, match="block_size must divide head_dim; got block_size=6 for head_dim=16"
    ):
        LieRE(16, block_size=6)
    with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
        LieRE(16, block_size=1)
    with pytest.raises(ValueError, match="head_dim must be an integer >= 1"):
        LieRE(0)
    with pytest.raises(ValueError, match="num_axes must be an integer >= 1"):
        LieRE(8, 0)
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1"):
        MixedRoPE(8, num_heads=0)
    with pytest.raises(ValueError, match="init must be"):
        LieRE(8, init="xavier")
    with pytest.raises(ValueError, match="even head_dim"):
        AxialRoPE(7)
    with pytest.raises(ValueError, match="even head_dim"):
        MixedRoPE(7)
    with pytest.raises(ValueError, match="fewer than num_axes=3"):
        AxialRoPE(4, 3)
    with pytest.raises(ValueError, match="max_freq and base must be positive"):
        AxialRoPE(8, max_freq=-1.0)


def test_forward_errors(encoding_name):
    enc = make(encoding_name, d=16, a=2, h=2)
    name = type(enc).__name__
    q = randn(2, 2, 4, 16, seed=0)
    pos = grid_positions(2, 2)
    with pytest.raises(
        ValueError,
        match=rf"{name}: q must have shape \(batch, heads, tokens, 16\); got \(2, 2, 4, 8\)",
    ):
        enc(q[..., :8], q, pos)
    with pytest.raises(ValueError, match=r"k must have shape"):
        enc(q, q[0], pos)
    with pytest.raises(
        ValueError, match=r"positions must have shape \(tokens, num_axes\) = \(4, 2\).*got \(4, 3\)"
    ):
        enc(q, q, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"got \(3, 2\)"):
        enc(q, q, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(batch, tokens, num_axes\) = \(2, 4, 2\)"):
        enc(q, q, torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="agree in batch and tokens"):
        enc(q, q[:, :, :3], pos)
    with pytest.raises(ValueError, match="must be floating point"):
        enc(q.long(), q.long(), pos)
    with pytest.raises(ValueError, match="real coordinates"):
        enc(q, q, pos.bool())
    with pytest.raises(TypeError, match="positions must be a Tensor"):
        enc(q, q, [[0.0, 0.0]] * 4)
    with pytest.raises(ValueError, match="on meta but q is on cpu"):
        enc(q, q, pos.to("meta"))


@pytest.mark.parametrize("name", ["liere8", "liere2", "mixed"])
def test_per_head_encoding_rejects_other_head_counts(name):
    enc = make(name, d=16, a=2, h=3)
    with pytest.raises(
        ValueError,
        match=r"num_heads=3 .* q of shape \(1, 2, 4, 16\) has 2 heads in dim 1.*"
        r"\(batch, tokens, heads, head_dim\), pass q.transpose\(1, 2\)",
    ):
        enc(randn(1, 2, 4, 16), randn(1, 2, 4, 16), grid_positions(2, 2))


def test_integer_positions_are_accepted_as_coordinates():
    enc = AxialRoPE(8, 1, max_freq=1.0, base=10000.0)
    q = randn(1, 1, 5, 8)
    out_int, _ = enc(q, q, torch.arange(5).unsqueeze(-1))
    out_float, _ = enc(q, q, torch.arange(5.0).unsqueeze(-1))
    assert torch.equal(out_int, out_float)


@pytest.mark.parametrize("chunk", [None, 3])
def test_rotate_single_tensor_equals_forward_q(encoding_name, chunk):
    enc = make(encoding_name)
    enc.max_tokens_per_chunk = chunk
    q, k = randn(2, 2, 9, 16, seed=1), randn(2, 2, 9, 16, seed=2)
    positions = grid_positions(3, 3)
    q_out, _ = enc(q, k, positions)
    torch.testing.assert_close(enc.rotate(q, positions), q_out, atol=1e-6, rtol=0)

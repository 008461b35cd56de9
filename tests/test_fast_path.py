"""Fast LieRE: the fast exponential and application agree with the reference path; nothing is
cached implicitly, and freeze() reuses rotations only for its own positions."""

import pytest
import torch
from conftest import assert_fast_matches_reference, randn

from liere import AxialRoPE, LieRE, MixedRoPE, grid_positions
from liere import functional as F
from liere.testing import assert_orthogonal


@pytest.fixture(autouse=True)
def _on_both_paths(both_paths):
    """Every test here runs with and without the compiled kernels."""


def paper_bases(h, a, m, s, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = torch.rand(h, a, m, s * (s - 1) // 2, generator=gen, dtype=torch.float64) * 6.2832
    return F.skew_symmetric(params, s).to(dtype)


@pytest.mark.parametrize("block", [4, 8, 16, 64])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])  # 4.0: four times the training range
def test_lie_rotations_match_float64_reference(block, scale):
    bases = paper_bases(2, 2, 64 // block, block, seed=block)
    positions = grid_positions(5, 5) * scale
    out = F.lie_rotations(positions, bases).double()
    gen64 = F.block_generators(positions.double(), bases.double())
    ref = F.expm_skew_reference(gen64)
    spectral = torch.linalg.matrix_norm(gen64, ord=2).max().item()
    tol = 10 * block * torch.finfo(torch.float32).eps * max(1.0, spectral)
    assert (out - ref).abs().max().item() <= tol
    eye = torch.eye(block, dtype=torch.float64)
    assert (out.mT @ out - eye).abs().max().item() <= tol


def test_lie_rotations_float64_path():
    bases = paper_bases(1, 2, 2, 8, dtype=torch.float64)
    positions = grid_positions(4, 4, dtype=torch.float64) * 4
    out = F.lie_rotations(positions, bases)
    ref = F.expm_skew_reference(F.block_generators(positions, bases))
    torch.testing.assert_close(out, ref, atol=1e-11, rtol=0)


@pytest.mark.parametrize("block", [4, 8])
def test_fast_and_reference_paths_agree_in_values_and_gradients(block):
    torch.manual_seed(0)
    q, k = randn(2, 2, 16, 16, seed=1), randn(2, 2, 16, 16, seed=2)
    positions = grid_positions(4, 4) * 2
    assert_fast_matches_reference(2, block, q, k, positions, randn(2, 2, 16, 16, seed=3))


def test_squarings_for():
    assert F.squarings_for(0.0) == 0 and F.squarings_for(1.0) == 0
    assert F.squarings_for(34.0) == 5  # float32 series is accurate up to norm 1.3
    assert F.squarings_for(34.0, torch.float64) == 6
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.squarings_for(float("inf"))


@pytest.mark.parametrize("rot_heads", [1, 3])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pair_application_matches_single(rot_heads, per_sample):
    b, h, n, m, s = 2, 3, 5, 4, 4
    q, k = randn(b, h, n, m * s, seed=1), randn(b, h, n, m * s, seed=2)
    shape = (b, rot_heads, n, m, s, s) if per_sample else (rot_heads, n, m, s, s)
    rot = randn(*shape, seed=3)
    q_out, k_out = F.apply_blockwise_pair(q, k, rot)
    torch.testing.assert_close(q_out, F.apply_blockwise(q, rot))
    torch.testing.assert_close(k_out, F.apply_blockwise(k, rot))
    k_small = randn(b, 1, n, m * s, seed=4)  # GQA: different shapes fall back to two calls
    if rot_heads == 1:
        _, k2 = F.apply_blockwise_pair(q, k_small, rot)
        torch.testing.assert_close(k2, F.apply_blockwise(k_small, rot))


# -- no implicit cache (Note [no implicit cache]) ------------------------------------------


def counting(cls):
    """``cls`` with its documented subclass hook ``_rotations`` (Note [no implicit cache])
    overridden to count the rotations it computes."""

    class Counting(cls):
        calls = 0

        def _rotations(self, positions):
            self.calls += 1
            return super()._rotations(positions)

    return Counting


def eval_call(enc, positions, q=None):
    q = randn(2, enc.num_heads, positions.shape[0], enc.head_dim, seed=1) if q is None else q
    with torch.no_grad():
        return enc(q, q, positions)[0]


@pytest.fixture
def enc():
    torch.manual_seed(0)
    return LieRE(16, 2, num_heads=2, block_size=8).eval()


def test_learned_positions_in_eval_get_their_own_gradients(enc):
    """Two eval calls with positions that require grad: each backward runs, and each
    gradient lands on its own positions tensor (an implicit cache reused the first graph)."""
    enc.requires_grad_(False)  # a frozen model, learned positions upstream
    q = randn(1, 2, 9, 16, seed=1)
    grads = []
    for scale in (1.0, 1.0, 2.0):
        pos = (grid_positions(3, 3) * scale).requires_grad_()
        q_out, k_out = enc(q, q, pos)
        (q_out * k_out.flip(2)).sum().backward()
        assert pos.grad is not None and pos.grad.abs().sum() > 0
        grads.append(pos.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert not torch.allclose(grads[0], grads[2])


@pytest.mark.parametrize("update", ["mul", "copy"])
def test_eval_outputs_follow_in_place_data_updates(enc, update):
    """``.data.mul_()`` / ``.data.copy_()`` (older EMA code) bump no version counter: the next
    eval call must still see the new weights."""
    pos = grid_positions(3, 3)
    eval_call(enc, pos)
    if update == "mul":
        enc.weight.data.mul_(0.5)
    else:
        enc.weight.data.copy_(torch.rand_like(enc.weight))
    fresh = LieRE(16, 2, num_heads=2, block_size=8).eval()
    fresh.load_state_dict(enc.state_dict())
    assert torch.equal(eval_call(enc, pos), eval_call(fresh, pos))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: LieRE(16, 2, num_heads=2, block_size=8),
        lambda: MixedRoPE(16, 2, num_heads=2),
        lambda: AxialRoPE(16, 2),
    ],
    ids=["liere8", "mixed", "axial"],
)
def test_pickle_and_save_carry_no_rotations(factory, tmp_path):
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    enc = factory().eval()
    pos = grid_positions(14, 14)

    def sizes():
        buffer = io.BytesIO()
        torch.save(enc, buffer)
        return len(pickle.dumps(enc)), buffer.tell()

    before = sizes()
    eval_call(enc, pos)
    assert sizes() == before
    enc.freeze(pos)
    assert sizes() == before
    q = randn(2, enc.num_heads, 196, 16, seed=1)
    for loaded in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        assert not loaded.is_frozen and enc.is_frozen
        torch.testing.assert_close(loaded(q, q, pos)[0], enc(q, q, pos)[0], atol=0, rtol=0)


def test_rotations_are_recomputed_on_every_eval_call():
    torch.manual_seed(0)
    enc = counting(LieRE)(16, 2, num_heads=2, block_size=8).eval()
    pos = grid_positions(3, 3)
    eval_call(enc, pos)
    eval_call(enc, pos)
    assert enc.calls == 2


# -- freeze --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda: counting(LieRE)(16, 2, num_heads=2, block_size=8),
        lambda: counting(LieRE)(16, 2, num_heads=2, block_size=2),
        lambda: counting(MixedRoPE)(16, 2, num_heads=2),
        lambda: counting(AxialRoPE)(16, 2),
    ],
    ids=["liere8", "liere2", "mixed", "axial"],
)
def test_freeze_gives_identical_outputs_without_recomputing(factory):
    torch.manual_seed(0)
    enc = factory()
    pos = grid_positions(3, 3)
    q = randn(2, 2, 9, 16, seed=1)
    expected = enc(q, q, pos)[0]
    enc.freeze(pos)
    enc.calls = 0
    assert enc.is_frozen
    assert torch.equal(enc(q, q, grid_positions(3, 3))[0], expected)
    assert enc.calls == 0
    enc(q[:, :, :4], q[:, :, :4], grid_positions(2, 2))  # other positions: computed
    assert enc.calls == 1
    enc.unfreeze()
    enc(q, q, pos)
    assert enc.calls == 2 and not enc.is_frozen


def test_frozen_rotations_follow_device_moves_but_keep_precision():
    enc = LieRE(16, 2, block_size=8).freeze(grid_positions(3, 3))
    rot = enc.frozen_rotations
    enc.to(torch.float64)
    frozen = enc.frozen_rotations
    assert frozen.dtype == torch.float32 and torch.equal(frozen, rot)


def test_freeze_errors():
    enc = LieRE(16, 2)
    with pytest.raises(ValueError, match=r"freeze takes shared positions of shape \(tokens, 2\)"):
        enc.freeze(torch.zeros(2, 9, 2))
    with pytest.raises(ValueError, match="float32 or float64"):
        enc.freeze(grid_positions(2, 2), dtype=torch.bfloat16)


def test_orthogonal_at_four_times_training_range_for_dense():
    torch.manual_seed(0)
    enc = LieRE(64, 2, num_heads=2, block_size=64)
    assert_orthogonal(enc, grid_positions(6, 6) * 4)


def test_frozen_rotations_are_what_freeze_stored():
    enc = LieRE(16, 2, block_size=8)
    assert enc.frozen_rotations is None
    pos = grid_positions(3, 3)
    with torch.no_grad():
        expected = F.lie_rotations(pos, enc.bases())
    torch.testing.assert_close(enc.freeze(pos).frozen_rotations, expected)
    assert enc.unfreeze().frozen_rotations is None
    cos, sin = AxialRoPE(16, 2).freeze(pos).frozen_rotations  # the RoPE family: (cos, sin)
    torch.testing.assert_close(cos.square() + sin.square(), torch.ones_like(cos))

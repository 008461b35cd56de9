"""GPU-readiness without a GPU: the device-generic path reads nothing on the host.

Meta tensors hold no values, so any host read of one raises; a dispatch mode that answers
``aten._local_scalar_dense`` (what ``float()``, ``int()``, ``bool()`` and ``.item()`` call)
counts the reads instead, so both settings of ``check_finite`` are measured."""

import math
import warnings

import pytest
import torch
from conftest import randn
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from liere import AxialRoPE, CayleySTRING, ComRoPE, LieRE, MixedRoPE, grid_positions
from liere import functional as F
from liere.definition import block_generators, rotations_reference
from liere.models import VisionTransformer


class _HostReads(TorchDispatchMode):
    """Counts host reads of tensor values and answers them with 1 (meta tensors have none)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
            return 1
        return func(*args, **(kwargs or {}))


ENCODINGS = {
    "rope-axial": lambda d: AxialRoPE(64, 2, device=d),
    "rope-mixed": lambda d: MixedRoPE(64, 2, num_heads=6, device=d),
    "liere-8": lambda d: LieRE(64, 2, num_heads=6, block_size=8, device=d),
    "liere-2": lambda d: LieRE(64, 2, num_heads=6, block_size=2, device=d),
    "liere-dense": lambda d: LieRE(64, 2, num_heads=6, block_size=64, device=d),
    "liere-8-3d": lambda d: LieRE(64, 3, num_heads=6, block_size=8, device=d),
    "comrope-ap": lambda d: ComRoPE(64, 2, num_heads=6, device=d),
    "comrope-ld": lambda d: ComRoPE(64, 2, num_heads=6, variant="ld", device=d),
    "string-cayley": lambda d: CayleySTRING(64, 2, num_heads=6, device=d),
}


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("check_finite", [False, True], ids=["unchecked", "checked"])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_training_step_reads_nothing_on_the_host(name, check_finite, per_sample):
    enc = ENCODINGS[name]("meta")
    enc.check_finite = check_finite
    axes = 3 if name.endswith("3d") else 2
    q = torch.empty(2, 6, 197, 64, device="meta", requires_grad=True)
    k = torch.empty(2, 6, 197, 64, device="meta", requires_grad=True)
    shape = (2, 196, axes) if per_sample else (196, axes)
    positions = torch.empty(shape, device="meta")
    mode = _HostReads()
    with mode:
        q_out, k_out = enc(q, k, positions, num_prefix_tokens=1)
        (q_out.sum() + k_out.sum()).backward()
    assert q_out.shape == q.shape and q.grad is not None and q.grad.shape == q.shape
    assert all(p.grad is not None for p in enc.parameters())
    assert mode.reads == (1 if check_finite else 0)


def test_meta_values_really_cannot_be_read():
    # the premise of the test above: without the mode, a host read of a meta tensor raises
    enc = LieRE(64, 2, num_heads=6, block_size=8, device="meta")
    q = torch.empty(1, 6, 196, 64, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        enc(q, q, torch.empty(196, 2, device="meta"))
    enc.check_finite = False
    assert enc(q, q, torch.empty(196, 2, device="meta"))[0].device.type == "meta"


def test_vit_forward_backward_on_meta_reads_nothing():
    model = VisionTransformer(32, 8, 10, dim=64, depth=2, num_heads=2, pos_enc="liere")
    model = model.to("meta")
    for module in model.modules():
        if hasattr(module, "check_finite"):
            module.check_finite = False
    mode = _HostReads()
    with mode:
        model(torch.empty(2, 3, 32, 32, device="meta")).sum().backward()
    assert mode.reads == 0


# -- values of the device-generic path, checked on the CPU ---------------------------------


def _bases(block, axes=2, heads=3, seed=0):
    torch.manual_seed(seed)
    return LieRE(2 * block, axes, num_heads=heads, block_size=block).bases()  # two blocks


@pytest.mark.parametrize("block,axes", [(4, 1), (8, 2), (16, 2), (8, 3)])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_generic_path_matches_the_reference(block, axes, scale):
    bases = _bases(block, axes).detach()
    positions = grid_positions(*([5] * axes)) * scale
    expected = rotations_reference(positions.double(), bases.double())
    norm = float(torch.linalg.matrix_norm(block_generators(positions, bases), ord=2).max())
    for check_finite in (True, False):
        out = F.lie_rotations_generic(positions, bases, check_finite=check_finite)
        assert out.dtype == torch.float32 and out.shape == expected.shape
        tol = 10 * block * torch.finfo(torch.float32).eps * max(1.0, norm)
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)


@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(0.05, 30.0),
    block=st.sampled_from([3, 4, 8]),
    per_sample=st.booleans(),
)
def test_generic_path_is_the_exponential_float64(seed, scale, block, per_sample):
    bases = _bases(block, 2, heads=2, seed=seed % 97).detach().double()
    positions = randn(6, 2, seed=seed, dtype=torch.float64) * scale
    if per_sample:
        positions = torch.stack([positions, positions.flip(0) * 0.5])
    out = F.lie_rotations_generic(positions, bases, check_finite=bool(seed % 2))
    expected = rotations_reference(positions, bases)
    torch.testing.assert_close(out, expected, atol=1e-12 * max(1.0, scale * 40), rtol=0)


def test_generic_path_gradients_match_the_reference():
    bases = _bases(8, 2).detach().double().requires_grad_()
    positions = (grid_positions(3, 4).double() * 3).requires_grad_()
    weights = randn(3, 12, 2, 8, 8, seed=3, dtype=torch.float64)  # (h, n, m, s, s)
    out = (F.lie_rotations_generic(positions, bases) * weights).sum()
    got = torch.autograd.grad(out, (positions, bases))
    ref = (rotations_reference(positions, bases) * weights).sum()
    expected = torch.autograd.grad(ref, (positions, bases))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9)


def test_generic_path_gradcheck_and_gradgradcheck():
    bases = _bases(4, 2, heads=1).detach().double().requires_grad_()
    positions = (randn(3, 2, seed=1, dtype=torch.float64) * 2).requires_grad_()

    def unchecked(p, b):  # all 40 float64 levels, masked
        return F.lie_rotations_generic(p, b, check_finite=False)

    def checked(p, b):  # the levels the norm needs
        return F.lie_rotations_generic(p, b, check_finite=True)

    assert torch.autograd.gradcheck(unchecked, (positions, bases))
    assert torch.autograd.gradcheck(checked, (positions, bases))
    assert torch.autograd.gradgradcheck(checked, (positions, bases))


def test_generic_path_reorthogonalizes_like_the_cpu_path():
    bases = _bases(16, 2).detach()
    positions = grid_positions(6, 6) * 60  # far past the training range

    def drift(rot):
        r = rot.double()
        eye = torch.eye(r.shape[-1], dtype=r.dtype)
        return float((r.mT @ r - eye).abs().amax())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kept = F.lie_rotations_generic(positions, bases, reorthogonalize_above=None)
        fixed = F.lie_rotations_generic(positions, bases, reorthogonalize_above=100.0)
        unchecked = F.lie_rotations_generic(
            positions, bases, reorthogonalize_above=100.0, check_finite=False
        )
    assert drift(fixed) < drift(kept) / 4
    torch.testing.assert_close(unchecked, fixed, atol=0, rtol=0)


# -- what each setting does with bad input -------------------------------------------------


def test_checked_generic_path_raises_on_nan_and_warns_at_large_norms():
    bases = _bases(8, 2).detach()
    positions = grid_positions(4, 4)
    bad = positions.clone()
    bad[5, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf .* positions or parameters"):
        F.lie_rotations_generic(bad, bases)
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.lie_rotations_generic(positions, bases.clone().fill_(math.inf))
    with pytest.warns(RuntimeWarning, match="lose accuracy"):
        F.lie_rotations_generic(positions * 2e3, bases)


def test_unchecked_generic_path_marks_bad_tokens_nan_and_keeps_the_rest():
    bases = _bases(8, 2).detach()
    positions = grid_positions(4, 4)
    bad = positions.clone()
    bad[5, 1] = math.inf
    out = F.lie_rotations_generic(bad, bases, check_finite=False)
    nan_tokens = torch.isnan(out).flatten(2).any(-1).any(0)
    assert nan_tokens.nonzero().flatten().tolist() == [5]
    keep = torch.arange(16) != 5
    expected = F.lie_rotations_generic(positions, bases, check_finite=False)
    torch.testing.assert_close(out[:, keep], expected[:, keep], atol=0, rtol=0)
    # past the levels run unchecked (LARGE_NORM), NaN: never a rotation computed out of range
    far = positions.clone()
    far[2] = 1e5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing can warn without a host read
        out = F.lie_rotations_generic(far, bases, check_finite=False)
    assert torch.isnan(out[:, 2]).all()
    assert not torch.isnan(out[:, torch.arange(16) != 2]).any()


def test_unchecked_levels_cover_the_large_norm_threshold():
    for dtype in (torch.float32, torch.float64):
        assert F.max_levels(dtype) == F.squarings_for(F.LARGE_NORM[dtype], dtype)
    bases = _bases(8, 2).detach()
    positions = grid_positions(4, 4)
    # the documented bound: sum_a |p_a| ||B_a||_F / sqrt(2), per token and block
    frobenius = torch.linalg.matrix_norm(bases) / 2**0.5  # (h, a, m)
    bound = (positions.abs()[None, :, :, None] * frobenius[:, None]).sum(-2)
    scale = 0.9 * F.LARGE_NORM[torch.float32] / float(bound.max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        checked = F.lie_rotations_generic(positions * scale, bases)
    unchecked = F.lie_rotations_generic(positions * scale, bases, check_finite=False)
    assert not torch.isnan(unchecked).any()
    torch.testing.assert_close(unchecked, checked, atol=0, rtol=0)


def test_backward_operators_read_nothing_on_the_host_off_the_cpu():
    # what a compiled graph runs in its backward on a GPU: torch.func on the caller's thread
    ops = torch.ops.liere
    bases = torch.empty(2, 2, 2, 8, 8, device="meta")
    positions = torch.empty(196, 2, device="meta")
    rot = torch.empty(2, 196, 2, 8, 8, device="meta")
    q = torch.empty(3, 2, 197, 16, device="meta")
    mode = _HostReads()
    with mode:
        for positions_grad in (False, True):
            grad_p, grad_b = ops.lie_rotations_backward(
                rot, positions, bases, rot, 1024.0, False, positions_grad, []
            )
            assert grad_p.shape == positions.shape and grad_b.shape == bases.shape
        gq, gk, gr = ops.apply_blockwise_pair_backward(q, q, q, q, rot, 1)
        assert gq.shape == q.shape and gr.shape == rot.shape
        gx, gr = ops.apply_blockwise_backward(q[:, :, 1:], q[:, :, 1:], rot)
        assert gx.shape == (3, 2, 196, 16) and gr.shape == rot.shape
    assert mode.reads == 0

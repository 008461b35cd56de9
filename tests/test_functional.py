import math

import pytest
import torch
from conftest import randn
from hypothesis import given
from hypothesis import strategies as st

from liere import functional as F


def random_skew(batch, size, norm, *, seed=0, dtype=torch.float64):
    """Skew-symmetric blocks scaled to a given 1-norm."""
    params = randn(batch, size * (size - 1) // 2, seed=seed, dtype=torch.float64)
    gen = F.skew_symmetric(params, size)
    gen = gen / gen.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1) * norm
    return gen.to(dtype)


@given(st.integers(2, 9), st.integers(0, 1000))
def test_skew_symmetric_is_exact(size, seed):
    params = randn(3, 2, size * (size - 1) // 2, seed=seed)
    a = F.skew_symmetric(params, size)
    assert a.shape == (3, 2, size, size)
    assert torch.equal(a, -a.mT)
    rows, cols = torch.triu_indices(size, size, 1)
    assert torch.equal(a[..., rows, cols], params)


def test_skew_symmetric_error():
    with pytest.raises(ValueError, match="size\\*\\(size-1\\)/2 = 6 entries"):
        F.skew_symmetric(torch.zeros(5), 4)


@pytest.mark.parametrize("method", ["auto", "taylor", "matrix_exp"])
@pytest.mark.parametrize("size", [2, 4, 8])
def test_exp_of_zero_is_identity(method, size):
    out = F.expm_skew(torch.zeros(5, size, size), method=method)
    assert torch.equal(out, torch.eye(size).expand(5, size, size))


def test_one_by_one_blocks():
    assert torch.equal(F.expm_skew(torch.zeros(3, 1, 1)), torch.ones(3, 1, 1))


def test_closed_form_2x2_matches_matrix_exp():
    gen = random_skew(50, 2, 7.0)
    torch.testing.assert_close(F.expm_skew(gen), torch.linalg.matrix_exp(gen), atol=1e-13, rtol=0)


# 1-norms from tiny to 4x beyond what dense LieRE reaches at the paper's init on [0, 1]^2
# (about 230 at p = (1, 1) for head_dim 64): the squarings must stay accurate at all of them.
@pytest.mark.parametrize("norm", [1e-3, 0.5, 1.0, 3.0, 27.0, 110.0, 230.0, 920.0])
@pytest.mark.parametrize("size", [4, 8, 16, 64])
def test_taylor_float32_matches_float64_reference(size, norm):
    gen64 = random_skew(12, size, norm, seed=size)
    reference = torch.linalg.matrix_exp(gen64)
    out = F.expm_skew(gen64.float(), method="taylor").double()
    spectral = torch.linalg.matrix_norm(gen64, ord=2).max().item()
    tol = 10 * size * torch.finfo(torch.float32).eps * max(1.0, spectral)
    assert (out - reference).abs().max().item() <= tol
    eye = torch.eye(size, dtype=torch.float64)
    assert (out.mT @ out - eye).abs().max().item() <= tol


@pytest.mark.parametrize("norm", [0.5, 27.0, 230.0])
def test_taylor_float64_matches_reference(norm):
    gen = random_skew(6, 8, norm, seed=3)
    out = F.expm_skew(gen, method="taylor")
    spectral = torch.linalg.matrix_norm(gen, ord=2).max().item()
    tol = 10 * 8 * torch.finfo(torch.float64).eps * max(1.0, spectral)
    torch.testing.assert_close(out, torch.linalg.matrix_exp(gen), atol=tol, rtol=0)


def test_determinant_is_one():
    gen = random_skew(20, 8, 30.0, seed=1).float()
    det = torch.linalg.det(F.expm_skew(gen).double())
    torch.testing.assert_close(det, torch.ones_like(det), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [2, 3, 8])
def test_gradcheck_float64(size):
    params = randn(3, size * (size - 1) // 2, seed=size, dtype=torch.float64) * 2
    params.requires_grad_(True)

    def fn(p):
        return F.expm_skew(F.skew_symmetric(p, size))

    assert torch.autograd.gradcheck(fn, (params,))


@pytest.mark.parametrize("norm", [0.3, 5.0, 60.0])
def test_taylor_and_reference_agree_in_value_and_gradient(norm):
    gen = random_skew(10, 8, norm, seed=4).float().requires_grad_(True)
    upstream = randn(10, 8, 8, seed=5)
    fast = F.expm_skew(gen, method="taylor")
    (g_fast,) = torch.autograd.grad((fast * upstream).sum(), gen)
    ref = F.expm_skew(gen, method="matrix_exp")
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), gen)
    scale = max(1.0, norm)
    torch.testing.assert_close(fast, ref, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-4 * scale, rtol=1e-4)


def test_reference_handles_unmergeable_batch_dims():
    gen = random_skew(24, 4, 2.0).float().reshape(2, 3, 4, 4, 4).permute(1, 0, 2, 3, 4)
    out = F.expm_skew_reference(gen)
    torch.testing.assert_close(out, torch.linalg.matrix_exp(gen.contiguous()))


def test_expm_skew_errors():
    with pytest.raises(ValueError, match="square blocks"):
        F.expm_skew(torch.zeros(3, 2, 3))
    with pytest.raises(ValueError, match="float32 or float64; got torch.bfloat16"):
        F.expm_skew(torch.zeros(3, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="method must be"):
        F.expm_skew(torch.zeros(3, 4, 4), method="pade")
    bad = torch.zeros(2, 4, 4)
    bad[0, 0, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.expm_skew(bad)


def test_block_generators_is_the_weighted_sum():
    positions = randn(5, 3, seed=1)
    bases = randn(2, 3, 4, 2, 2, seed=2)
    out = F.block_generators(positions, bases)
    expected = torch.einsum("na,hamij->hnmij", positions, bases)
    torch.testing.assert_close(out, expected)
    per_sample = F.block_generators(positions.expand(4, 5, 3), bases)
    assert per_sample.shape == (4, 2, 5, 4, 2, 2)
    torch.testing.assert_close(per_sample[3], expected)


@pytest.mark.parametrize("heads_in_rotation", [1, 3])
@pytest.mark.parametrize("per_sample", [False, True])
def test_apply_blockwise_matches_dense_product(heads_in_rotation, per_sample):
    b, h, n, m, s = 2, 3, 5, 4, 3
    x = randn(b, h, n, m * s, seed=1)
    shape = (b, heads_in_rotation, n, m, s, s) if per_sample else (heads_in_rotation, n, m, s, s)
    rot = randn(*shape, seed=2)
    out = F.apply_blockwise(x, rot)
    dense = torch.zeros(*shape[:-3], m * s, m * s)
    for j in range(m):
        dense[..., j * s : (j + 1) * s, j * s : (j + 1) * s] = rot[..., j, :, :]
    expected = torch.einsum("...ij,...j->...i", dense, x)
    torch.testing.assert_close(out, expected)


def test_apply_rope_is_pairwise_rotation():
    x = randn(1, 1, 1, 4, seed=0)
    theta = torch.tensor([0.3, -1.2])
    out = F.apply_rope(x, theta.cos(), theta.sin())
    for j, t in enumerate(theta.tolist()):
        rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        torch.testing.assert_close(
            out[0, 0, 0, 2 * j : 2 * j + 2], rot @ x[0, 0, 0, 2 * j : 2 * j + 2]
        )


def test_compute_dtype():
    assert F.compute_dtype(torch.bfloat16, torch.float16) == torch.float32
    assert F.compute_dtype(torch.float32, torch.float64) == torch.float64

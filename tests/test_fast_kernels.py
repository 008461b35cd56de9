"""The hand-written kernels of the fast path against plain autograd: the Taylor exponential in
both layouts (Note [small-block layout]) and the blockwise application with prefix tokens
(Note [blockwise application])."""

import math

import pytest
import torch
from conftest import randn

from liere import LieRE, RotaryAttention, grid_positions
from liere import functional as F
from liere.speed import polynomial, taylor


@pytest.fixture(autouse=True)
def _on_both_paths(both_paths):
    """Every test here runs with and without the compiled kernels."""


def taylor_autograd(x, squarings):
    """The plain series sum_i X^i / i! (degree as the fast path) and j squarings, autograd."""
    k, chunks, _ = taylor.TAYLOR[x.dtype]
    eye = torch.eye(x.shape[-1], dtype=x.dtype).expand_as(x)
    term, total = eye, eye
    for i in range(1, k * chunks):
        term = term @ x / i
        total = total + term
    for _ in range(squarings):
        total = total @ total
    return total


def skew(count, size, norm, seed, dtype=torch.float64):
    a = randn(count, size, size, seed=seed, dtype=dtype)
    a = a - a.mT
    return a * (norm / torch.linalg.matrix_norm(a, ord=2).amax(-1)[..., None, None])


@pytest.mark.parametrize("size", [3, 8, 12])  # 3, 8: entry-major layout; 12: batch-major
@pytest.mark.parametrize("squarings", [0, 1, 3])
def test_taylor_backward_matches_autograd(size, squarings):
    x = skew(7, size, 1.0, seed=size).requires_grad_(True)
    upstream = randn(7, size, size, seed=1, dtype=torch.float64)
    fast = taylor.taylor_expm_squared(x, squarings)
    (g_fast,) = torch.autograd.grad((fast * upstream).sum(), x)
    ref = taylor_autograd(x, squarings)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), x)
    torch.testing.assert_close(fast, ref, atol=1e-13, rtol=0)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-12, rtol=0)


def test_entry_major_product_in_row_chunks(monkeypatch):
    a, b = randn(8, 8, 23, seed=1), randn(8, 8, 23, seed=2)
    whole = taylor.entry_major_mm(a, b)
    monkeypatch.setattr(taylor, "ENTRY_MAJOR_CHUNK", 5)  # 23 = 4 chunks of 5 + 3
    chunked = taylor.entry_major_mm(a, b)
    ref = torch.bmm(a.permute(2, 0, 1), b.permute(2, 0, 1)).permute(1, 2, 0)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    acc = whole.clone()
    torch.testing.assert_close(taylor.entry_major_mm(a, b, out=acc), 2 * whole)


@pytest.mark.parametrize("size", [4, 10])  # entry-major and batch-major layouts
def test_lie_rotations_gradcheck_both_layouts(size):
    blocks = 2 if size <= 8 else 1
    bases = skew(2 * blocks, size, 0.7, seed=size).view(1, 2, blocks, size, size)
    bases.requires_grad_(True)
    positions = randn(3, 2, seed=2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(F.lie_rotations, (positions, bases))


def test_lie_rotations_per_sample_positions_match_shared():
    bases = skew(2 * 2 * 2, 8, 1.0, seed=0, dtype=torch.float32).view(2, 2, 2, 8, 8)
    positions = grid_positions(3, 3) * 3
    per_sample = F.lie_rotations(positions.expand(2, 9, 2), bases)
    torch.testing.assert_close(per_sample[1], F.lie_rotations(positions, bases))


@pytest.mark.parametrize("size", [4, 12])
def test_taylor_double_backward_matches_autograd(size):
    # create_graph=True recomputes through plain autograd ops: second derivatives are exact
    x = skew(3, size, 1.0, seed=0).requires_grad_(True)
    up = randn(3, size, size, seed=1, dtype=torch.float64)
    results = []
    for fn in (taylor.taylor_expm_squared, taylor_autograd):
        (g,) = torch.autograd.grad((fn(x, 2) * up).sum(), x, create_graph=True)
        results.append(torch.autograd.grad((g * g).sum(), x)[0])
    torch.testing.assert_close(results[0], results[1], atol=1e-10, rtol=0)


# -- blockwise application -----------------------------------------------------------------


def pair_reference(q, k, rot, p):
    """Slice, rotate with the plain einsum path, concatenate (all autograd)."""
    q_rot, k_rot = F.apply_blockwise(q[:, :, p:], rot), F.apply_blockwise(k[:, :, p:], rot)
    return torch.cat((q[:, :, :p], q_rot), 2), torch.cat((k[:, :, :p], k_rot), 2)


@pytest.mark.parametrize("rot_heads", [1, 3])
@pytest.mark.parametrize("prefix", [0, 2])
def test_pair_application_with_prefix_matches_reference(rot_heads, prefix):
    b, h, n, m, s = 2, 3, 5, 2, 4
    q = randn(b, h, prefix + n, m * s, seed=1).requires_grad_(True)
    k = randn(b, h, prefix + n, m * s, seed=2).requires_grad_(True)
    rot = randn(rot_heads, n, m, s, s, seed=3).requires_grad_(True)
    up_q, up_k = randn(*q.shape, seed=4), randn(*q.shape, seed=5)
    results = []
    for fn in (
        lambda: F.apply_blockwise_pair(q, k, rot, num_prefix_tokens=prefix),
        lambda: pair_reference(q, k, rot, prefix),
    ):
        q_out, k_out = fn()
        loss = (q_out * up_q).sum() + (k_out * up_k).sum()
        results.append((q_out, k_out, *torch.autograd.grad(loss, (q, k, rot))))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(results[0][0][:, :, :prefix], q[:, :, :prefix])


def test_pair_application_gradcheck_with_prefix():
    q = randn(2, 2, 4, 8, seed=1, dtype=torch.float64).requires_grad_(True)
    k = randn(2, 2, 4, 8, seed=2, dtype=torch.float64).requires_grad_(True)
    rot = randn(2, 3, 2, 4, 4, seed=3, dtype=torch.float64).requires_grad_(True)

    def fn(q, k, rot):
        return F.apply_blockwise_pair(q, k, rot, num_prefix_tokens=1)

    assert torch.autograd.gradcheck(fn, (q, k, rot))
    assert torch.autograd.gradgradcheck(fn, (q, k, rot))


def test_pair_application_accepts_strided_inputs():
    # q and k as RotaryAttention makes them: views into one qkv tensor
    qkv = randn(2, 6, 3, 2, 8, seed=0)  # (b, tokens, three, heads, d)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    rot = randn(2, 5, 2, 4, 4, seed=1)
    for fast, ref in zip(
        F.apply_blockwise_pair(q, k, rot, num_prefix_tokens=1), pair_reference(q, k, rot, 1)
    ):
        torch.testing.assert_close(fast, ref)


# -- encodings with prefix tokens ----------------------------------------------------------


@pytest.mark.parametrize("block", [2, 8])
def test_encoding_prefix_tokens_equal_slicing(block):
    torch.manual_seed(0)
    enc = LieRE(16, 2, num_heads=2, block_size=block)
    q, k = randn(2, 2, 10, 16, seed=1), randn(2, 2, 10, 16, seed=2)
    positions = grid_positions(3, 3)
    q_out, k_out = enc(q, k, positions, num_prefix_tokens=1)
    q_ref, k_ref = enc(q[:, :, 1:], k[:, :, 1:], positions)
    torch.testing.assert_close(q_out[:, :, 1:], q_ref)
    torch.testing.assert_close(k_out[:, :, 1:], k_ref)
    assert torch.equal(q_out[:, :, :1], q[:, :, :1]) and torch.equal(k_out[:, :, :1], k[:, :, :1])


def test_encoding_prefix_tokens_with_chunking():
    torch.manual_seed(0)
    enc = LieRE(16, 2, num_heads=2, block_size=4)
    q, k = randn(1, 2, 10, 16, seed=1), randn(1, 2, 10, 16, seed=2)
    positions = grid_positions(3, 3)
    whole = enc(q, k, positions, num_prefix_tokens=1)
    enc.max_tokens_per_chunk = 4
    chunked = enc(q, k, positions, num_prefix_tokens=1)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [-1, 11, 1.0, True])
def test_encoding_rejects_bad_prefix_count(bad):
    enc = LieRE(16, 2, num_heads=2, block_size=4)
    q = randn(1, 2, 10, 16, seed=1)
    with pytest.raises(ValueError, match="num_prefix_tokens must be an integer in"):
        enc(q, q, grid_positions(3, 3), num_prefix_tokens=bad)


def test_encoding_prefix_count_mismatch_names_the_prefix():
    enc = LieRE(16, 2, num_heads=2, block_size=4)
    q = randn(1, 2, 10, 16, seed=1)
    with pytest.raises(ValueError, match=r"tokens - num_prefix_tokens = 10 - 2"):
        enc(q, q, grid_positions(3, 3), num_prefix_tokens=2)


def test_attention_prefix_path_matches_manual_slicing():
    torch.manual_seed(0)
    layer = RotaryAttention(32, 2, pos_enc=LieRE(16, 2, num_heads=2), num_prefix_tokens=1)
    x = randn(2, 10, 32, seed=1)
    positions = grid_positions(3, 3)
    q, k, v = layer.qkv(x).view(2, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q_rot, k_rot = layer.pos_enc(q[:, :, 1:], k[:, :, 1:], positions)
    q, k = torch.cat((q[:, :, :1], q_rot), 2), torch.cat((k[:, :, :1], k_rot), 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    expected = layer.proj(out.transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(layer(x, positions), expected, atol=1e-5, rtol=1e-5)


def test_taylor_degree_table_is_accurate():
    # the fast path's degree: truncation theta^(deg+1)/(deg+1)! under the unit roundoff
    for dtype, (k, chunks, theta) in taylor.TAYLOR.items():
        degree = k * chunks - 1
        bound = theta ** (degree + 1) / math.factorial(degree + 1)
        assert bound <= torch.finfo(dtype).eps


# -- the series as a polynomial in the positions -------------------------------------------


@pytest.mark.parametrize("axes", [1, 2])
def test_polynomial_series_equals_the_taylor_series(axes):
    degree = 7
    bases = skew(2 * axes * 3, 4, 0.8, seed=axes).view(2, axes, 3, 4, 4)
    positions = randn(5, axes, seed=1, dtype=torch.float64)
    coefficients = polynomial.poly_coefficients(bases, degree)  # (h*m, s, T*s)
    weights = polynomial.poly_weights(positions, degree)  # (n, T)
    terms = weights.shape[-1]
    assert terms == math.comb(degree + axes, axes)
    blocks = coefficients.view(6, 4, terms, 4)
    series = torch.einsum("nt,qitj->nqij", weights, blocks)
    gen = torch.einsum("na,haqij->nhqij", positions, bases).reshape(5, 6, 4, 4)
    term, expected = torch.eye(4, dtype=torch.float64).expand(5, 6, 4, 4), 0
    for k in range(degree + 1):
        expected = expected + term
        term = term @ gen / (k + 1)
    torch.testing.assert_close(series, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("axes", [1, 2])
def test_poly_weights_are_the_monomials_over_factorials(axes, dtype):
    # p_0^i p_1^(k-i) / k! ordered by degree k, then i, up to float64's degree 24
    positions = (randn(6, axes, seed=3) * 1.5).to(dtype)
    for degree in (0, 1, 14, 24):
        exps = [(i, k - i, k) for k in range(degree + 1) for i in range(k + 1)]
        if axes == 1:
            exps = [(k, 0, k) for k in range(degree + 1)]
        columns = []
        for e0, e1, k in exps:
            monomial = positions[:, 0] ** e0 * (positions[:, 1] ** e1 if axes == 2 else 1)
            columns.append(monomial * (1.0 / math.factorial(k)))
        expected = torch.stack(columns, dim=-1)
        got = polynomial.poly_weights(positions, degree)
        assert got.shape == (6, polynomial.poly_terms(degree, axes))
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(got, expected, rtol=tol, atol=0)


@pytest.mark.parametrize("axes", [1, 2])
def test_coefficient_recursion_backward_matches_autograd(axes, both_paths):
    # PolyCoefficients' hand-written backward against autograd through the plain recursion
    bases = skew(2 * axes * 2, 3, 0.7, seed=5 + axes).view(2, axes, 2, 3, 3)
    stacked = polynomial.stack_axes(bases).requires_grad_(True)
    fast = polynomial.PolyCoefficients.apply(stacked, 5)
    plain = polynomial.poly_coefficients_plain(stacked, 5)
    torch.testing.assert_close(fast, plain, atol=1e-13, rtol=0)
    grad = randn(*fast.shape, seed=6, dtype=torch.float64)
    (d_fast,) = torch.autograd.grad(fast, stacked, grad)
    (d_plain,) = torch.autograd.grad(plain, stacked, grad)
    torch.testing.assert_close(d_fast, d_plain, atol=1e-11, rtol=0)
    assert torch.autograd.gradcheck(lambda x: polynomial.PolyCoefficients.apply(x, 3), (stacked,))


@pytest.mark.parametrize("axes", [1, 3])  # 3 axes: Paterson-Stockmeyer per token
@pytest.mark.parametrize("block", [4, 16])
def test_lie_rotations_other_axis_counts_match_reference(axes, block):
    bases = skew(2 * axes * 2, block, 5.0, seed=block, dtype=torch.float32)
    bases = bases.view(2, axes, 2, block, block)
    positions = torch.rand(7, axes, generator=torch.Generator().manual_seed(0)) * 3
    out = F.lie_rotations(positions, bases).double()
    ref = F.expm_skew_reference(F.block_generators(positions.double(), bases.double()))
    spectral = (
        torch.linalg.matrix_norm(
            ref.new_tensor(0) + F.block_generators(positions.double(), bases.double()), ord=2
        )
        .max()
        .item()
    )
    tol = 10 * block * torch.finfo(torch.float32).eps * max(1.0, spectral)
    assert (out - ref).abs().max().item() <= tol


def test_polynomial_path_gradients_at_zero_positions_are_finite():
    bases = skew(4, 4, 1.0, seed=0, dtype=torch.float32).view(1, 2, 2, 4, 4)
    positions = torch.zeros(3, 2, requires_grad=True)
    F.lie_rotations(positions, bases).sum().backward()
    assert torch.isfinite(positions.grad).all()


def test_attention_with_an_overridden_encoding_forward_gets_sliced_tokens():
    # a subclass (or patch) with the old forward(q, k, positions) signature keeps working
    class Logged(LieRE):
        def forward(self, q, k, positions):
            self.seen = q.shape
            return super().forward(q, k, positions)

    torch.manual_seed(0)
    enc = Logged(16, 2, num_heads=2)
    layer = RotaryAttention(32, 2, pos_enc=enc, num_prefix_tokens=1)
    layer(randn(2, 10, 32, seed=1), grid_positions(3, 3))
    assert enc.seen == (2, 2, 9, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", polynomial.SERIES_LAYOUTS)
@pytest.mark.parametrize("axes", [1, 2])
@pytest.mark.parametrize("block", [4, 8, 16])
def test_poly_series_matches_its_plain_ops(block, axes, layout, dtype, both_paths):
    # coefficients and series GEMM as one Function (the kernel writes the GEMM's layout
    # directly for entry-major series): values and gradients of the bases and the monomials
    bases = skew(2 * axes * 3, block, 0.4, seed=block + axes, dtype=dtype)
    stacked = polynomial.stack_axes(bases.view(2, axes, 3, block, block))
    degree = polynomial.POLY[dtype][0]
    positions = torch.rand(11, axes, generator=torch.Generator().manual_seed(2), dtype=dtype)
    weights = polynomial.poly_weights(positions, degree)
    leaves = [t.clone().requires_grad_() for t in (stacked, weights)]
    fast = polynomial.poly_series(*leaves, degree, layout)
    ref = polynomial.series_product_plain(
        polynomial.poly_coefficients_plain(leaves[0], degree), leaves[1], layout
    )
    assert fast.shape == polynomial.series_shape(6, block, 11, layout)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fast, ref, atol=64 * eps, rtol=0)
    grad = randn(*fast.shape, seed=4, dtype=dtype)
    d_fast = torch.autograd.grad(fast, leaves, grad)
    d_ref = torch.autograd.grad(ref, leaves, grad)
    for a, b in zip(d_fast, d_ref):
        torch.testing.assert_close(a, b, atol=256 * eps * b.abs().max(), rtol=0)


@pytest.mark.parametrize("layout", polynomial.SERIES_LAYOUTS)
def test_poly_series_gradcheck_and_gradgradcheck(layout, both_paths):
    bases = skew(4, 4, 0.4, seed=3).view(1, 2, 2, 4, 4)
    stacked = polynomial.stack_axes(bases).requires_grad_(True)
    weights = polynomial.poly_weights(torch.rand(5, 2, dtype=torch.float64), 4)
    weights.requires_grad_(True)
    fn = lambda s, w: polynomial.poly_series(s, w, 4, layout)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (stacked, weights))
    assert torch.autograd.gradgradcheck(fn, (stacked, weights))

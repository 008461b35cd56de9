"""Products along rays (Note [products along rays] in liere.functional): which tokens are split,
that the split tokens' rotations equal the exponential of their own generator, values and
gradients against the direct path and torch.matrix_exp, the compiled products against the
PyTorch ones, the cases that must stay on the direct path; and the coefficient scaling that
keeps large generators finite (Note [coefficient range])."""

import math

import pytest
import torch
from conftest import randn
from hypothesis import given
from hypothesis import strategies as st

from liere import LieRE, grid_positions
from liere import functional as F
from liere import kernels as K
from liere.speed import polynomial, rays
from liere.speed import token_squarings as squaring


def dense_bases(heads=2, axes=2, blocks=1, size=8, seed=0, scale=1.0, dtype=torch.float32):
    params = randn(heads, axes, blocks, size * (size - 1) // 2, seed=seed, dtype=dtype)
    return F.skew_symmetric(params * scale, size)


def reference(positions, bases):
    gen = F.block_generators(positions.double(), bases.double())
    return F.expm_skew_reference(gen)


def squarings(positions, bases):
    sigma = squaring.spectral_norms(bases.detach())
    bound = torch.matmul(positions.abs().unsqueeze(-3), sigma).amax(dim=(-3, -1))
    return squaring.token_squarings(bound, polynomial.POLY[bases.dtype][1])


def no_rays(monkeypatch):
    monkeypatch.setattr(rays, "ray_plan", lambda positions, js: None)


# -- the plan ---------------------------------------------------------------------------------


def test_plan_splits_the_grid_tokens_that_are_multiples():
    positions = grid_positions(14, 14)
    plan = rays.build_ray_plan(positions, torch.ones(196, dtype=torch.long))
    # token (i, j) is g * (i/g, j/g) with g = gcd(i, j) >= 2
    multiples = sum(math.gcd(i, j) >= 2 for i in range(14) for j in range(14))
    assert plan is not None and plan.split == multiples == 78
    assert len(plan.base) + plan.split == 196
    assert [len(level[0]) for level in plan.levels] == [25, 22, 16, 15]


def test_plan_lists_the_direct_tokens_most_squarings_first():
    # the squarings kernel squares 16 tokens side by side: sorted, its groups square alike
    torch.manual_seed(0)
    positions = grid_positions(14, 14)
    js = squarings(positions, LieRE(64, 2, num_heads=6, block_size=8).bases().detach())
    plan = rays.build_ray_plan(positions, js)
    assert plan is not None
    base = plan.base.tolist()
    keys = [(-int(js[t]), t) for t in base]  # count descending, then token order
    assert keys == sorted(keys)
    assert sorted(base + plan.items[0].tolist()) == list(range(196))


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    reference=st.integers(2, 12),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_plan_items_are_sums_of_parallel_tokens(rows, cols, reference, seed, dtype):
    positions = grid_positions(rows, cols, reference=reference, dtype=dtype)
    js = torch.randint(0, 3, (rows * cols,), generator=torch.Generator().manual_seed(seed))
    plan = rays.build_ray_plan(positions, js)
    if plan is None:
        return
    done = set(plan.base.tolist())
    eps = torch.finfo(dtype).eps
    for dst, left, right in plan.levels:
        for t, u, v in zip(dst.tolist(), left.tolist(), right.tolist()):
            assert u in done and v in done  # factors come from earlier levels
            assert js[t] >= 1  # tokens the direct path does not square stay direct
            p, q, r = positions[t].double(), positions[u].double(), positions[v].double()
            torch.testing.assert_close(q + r, p, atol=16 * eps * float(p.abs().max()), rtol=0)
            assert abs(float(q[0] * p[1] - q[1] * p[0])) <= 16 * eps * float(p.norm()) ** 2
            assert float(q @ p) > 0 and float(r @ p) > 0  # same direction, not opposite
        done.update(dst.tolist())
    assert done == set(range(rows * cols))


@pytest.mark.parametrize(
    "positions",
    [
        torch.rand(40, 2, generator=torch.Generator().manual_seed(0)),  # off any lattice
        grid_positions(6, 6) - 0.5,  # centred: halves of odd multiples are not tokens
        torch.zeros(5, 2),
    ],
    ids=["random", "centred", "origin"],
)
def test_plan_is_none_where_no_token_is_a_product(positions):
    js = torch.ones(positions.shape[0], dtype=torch.long)
    assert rays.build_ray_plan(positions, js) is None


def test_plan_leaves_repeated_positions_and_unsquared_tokens_direct():
    positions = torch.tensor([[0.25, 0.0], [0.5, 0.0], [0.5, 0.0], [0.75, 0.0], [1.0, 0.0]])
    plan = rays.build_ray_plan(positions, torch.tensor([1, 1, 1, 1, 0]))
    assert plan is not None
    split = torch.cat([level[0] for level in plan.levels]).tolist()
    assert 1 in split and 3 in split  # 0.5 = 0.25 + 0.25, 0.75 = 0.5 + 0.25
    assert 2 not in split  # the repeat of 0.5
    assert 4 not in split  # j = 0: computed directly


def test_plan_is_cached_per_positions_and_squarings(monkeypatch):
    built = []
    build = rays.build_ray_plan
    monkeypatch.setattr(rays, "RAY_PLAN_CACHE", {})
    monkeypatch.setattr(rays, "build_ray_plan", lambda p, j: built.append(1) or build(p, j))
    positions, js = grid_positions(5, 5), torch.ones(25, dtype=torch.long)
    first = rays.ray_plan(positions, js)
    assert rays.ray_plan(positions.clone(), js.clone()) is first and len(built) == 1
    rays.ray_plan(positions, js * 2)
    rays.ray_plan(grid_positions(5, 6), torch.ones(30, dtype=torch.long))
    assert len(built) == 3
    for k in range(2 * rays.RAY_PLAN_CACHE_SIZE):
        rays.ray_plan(grid_positions(3, 3 + k), torch.ones(3 * (3 + k), dtype=torch.long))
    assert len(rays.RAY_PLAN_CACHE) <= rays.RAY_PLAN_CACHE_SIZE


# -- values and gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [4, 8, 32, 64])
def test_split_rotations_match_matrix_exp_and_the_direct_path(
    both_paths, float_dtype, size, monkeypatch
):
    positions = grid_positions(9, 9, dtype=float_dtype)
    bases = dense_bases(
        heads=2, blocks=64 // size // 2 or 1, size=size, scale=2.0, dtype=float_dtype
    )
    js = squarings(positions, bases)
    plan = rays.ray_plan(positions, js)
    assert plan is not None and plan.split > 0
    leaf = bases.clone().requires_grad_(True)
    fast = F.lie_rotations(positions, leaf)
    ref = reference(positions, bases)
    eps = torch.finfo(float_dtype).eps
    norm = float(squaring.spectral_norms(bases).sum(1).amax()) * float(positions.abs().max())
    torch.testing.assert_close(fast.double(), ref, atol=10 * size * eps * max(1.0, norm), rtol=0)
    grad = randn(*fast.shape, seed=3, dtype=float_dtype)
    (d_fast,) = torch.autograd.grad(fast, leaf, grad)
    no_rays(monkeypatch)
    direct_leaf = bases.clone().requires_grad_(True)
    direct = F.lie_rotations(positions, direct_leaf)
    (d_direct,) = torch.autograd.grad(direct, direct_leaf, grad)
    scale = float(d_direct.abs().max())
    torch.testing.assert_close(
        d_fast, d_direct, atol=100 * size * eps * max(1.0, norm) * scale, rtol=0
    )


@pytest.mark.parametrize("size", [4, 32])  # 32: the compiled products (K.RAY_SIZES)
def test_ray_products_gradcheck(both_paths, size):
    # (1, 0) and (2, 1) direct, (2, 0) = (1, 0) + (1, 0), (3, 0) = (2, 0) + (1, 0): small
    # enough for gradcheck's dense Jacobians at 32x32 blocks
    positions = torch.tensor(
        [[0.25, 0.0], [0.5, 0.0], [0.75, 0.0], [0.5, 0.5]], dtype=torch.float64
    )
    bases = dense_bases(heads=1, size=size, scale=0.3, dtype=torch.float64)
    plan = rays.build_ray_plan(positions, torch.ones(4, dtype=torch.long))
    assert plan is not None and plan.base.tolist() == [0, 3] and len(plan.levels) == 2
    base = F.lie_rotations(positions[plan.base], bases).requires_grad_(True)
    # fast mode at 32x32: random projections of the Jacobians (2,048 inputs), not all of them
    fast = size > 8
    torch.autograd.gradcheck(lambda b: rays.RayProducts.apply(b, plan), (base,), fast_mode=fast)
    torch.autograd.gradgradcheck(lambda b: rays.RayProducts.apply(b, plan), (base,), fast_mode=fast)
    out = rays.RayProducts.apply(base, plan)
    plain = rays.ray_products_plain(base, plan)
    torch.testing.assert_close(out, plain, atol=1e-13, rtol=0)
    grad = randn(*out.shape, seed=1, dtype=torch.float64)
    (d_out,) = torch.autograd.grad(out, base, grad)
    (d_plain,) = torch.autograd.grad(plain, base, grad)
    torch.testing.assert_close(d_out, d_plain, atol=1e-12, rtol=0)


@pytest.mark.skipif(not K.available(), reason="compiled kernels unavailable")
@pytest.mark.parametrize("size", K.RAY_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_ray_products_match_torch(size, dtype):
    positions = grid_positions(8, 8, dtype=dtype)
    plan = rays.build_ray_plan(positions, torch.ones(64, dtype=torch.long))
    gen = randn(3, len(plan.base), 2, size, size, seed=2, dtype=torch.float64) * 0.1
    base = torch.linalg.matrix_exp(gen - gen.mT).to(dtype)  # (h, tokens, m, s, s) rotations
    rot = base.new_empty(3, 64, 2, size, size).index_copy_(1, plan.base, base)
    K.ray_products_forward(rot, *plan.items)
    plain = rays.ray_products_plain(base.requires_grad_(True), plan)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(rot, plain.detach(), atol=tol, rtol=0)
    grad = randn(*rot.shape, seed=4, dtype=dtype)
    kept = grad.clone()
    d_base = K.ray_products_backward(rot, grad, plan.base, *plan.items)
    assert torch.equal(grad, kept)  # the incoming gradient is left alone
    (d_plain,) = torch.autograd.grad(plain, base, grad)
    torch.testing.assert_close(d_base, d_plain, atol=tol * 10, rtol=0)


def test_positions_that_need_a_gradient_stay_direct(monkeypatch):
    calls = []
    plan = rays.ray_plan
    monkeypatch.setattr(rays, "ray_plan", lambda p, j: calls.append(1) or plan(p, j))
    positions = grid_positions(6, 6, dtype=torch.float64).requires_grad_(True)
    bases = dense_bases(size=8, scale=2.0, dtype=torch.float64)
    fast = F.lie_rotations(positions, bases)
    assert not calls
    grad = randn(*fast.shape, seed=5, dtype=torch.float64)
    (d_fast,) = torch.autograd.grad(fast, positions, grad)
    ref_pos = positions.detach().clone().requires_grad_(True)
    ref = F.expm_skew_reference(F.block_generators(ref_pos, bases))
    (d_ref,) = torch.autograd.grad(ref, ref_pos, grad)
    torch.testing.assert_close(d_fast, d_ref, atol=1e-9, rtol=1e-9)


def test_three_axes_and_batched_positions(monkeypatch):
    positions = grid_positions(4, 5, 5)
    bases = dense_bases(heads=2, axes=3, blocks=2, size=8, scale=1.5)
    assert rays.ray_plan(positions, squarings(positions, bases)) is not None
    fast = F.lie_rotations(positions, bases)
    torch.testing.assert_close(fast.double(), reference(positions, bases), atol=2e-5, rtol=0)
    batched = torch.stack([positions, positions.flip(0)])  # per-sample positions: direct
    torch.testing.assert_close(
        F.lie_rotations(batched, bases)[1], F.lie_rotations(positions.flip(0), bases)
    )


def test_lie_re_layer_matches_with_and_without_rays(monkeypatch):
    torch.manual_seed(0)
    enc = LieRE(64, 2, num_heads=2, block_size=64)
    q, k = torch.randn(2, 3, 2, 51, 64).unbind(0)
    positions = grid_positions(7, 7)
    positions = torch.cat([positions, positions[-1:]])  # a repeated position too

    def run():
        enc.zero_grad()
        q_out, k_out = enc(q, k, positions, num_prefix_tokens=1)
        (q_out * k_out.roll(1, dims=2)).sum().backward()
        return q_out, k_out, [p.grad.clone() for p in enc.parameters()]

    q_out, k_out, grads = run()
    no_rays(monkeypatch)
    q_dir, k_dir, grads_dir = run()
    torch.testing.assert_close(q_out, q_dir, atol=2e-4, rtol=0)
    torch.testing.assert_close(k_out, k_dir, atol=2e-4, rtol=0)
    for g, d in zip(grads, grads_dir):
        torch.testing.assert_close(g, d, atol=2e-3 * float(d.abs().max()), rtol=0)


# -- Note [coefficient range] -----------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_large_dense_generators_stay_finite(both_paths, scale):
    # dense 64x64 blocks at the paper's init have ||B_a|| near 130: unscaled, their degree-16
    # coefficients came within a factor 100 of float32's range, and 4x that overflowed
    torch.manual_seed(0)
    bases = LieRE(64, 2, num_heads=2, block_size=64).bases().detach() * scale
    positions = grid_positions(4, 4) * 0.5
    fast = F.lie_rotations(positions, bases)
    assert torch.isfinite(fast).all()
    norm = float(squaring.spectral_norms(bases).sum(1).amax()) * 0.5
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(
        fast.double(), reference(positions, bases), atol=10 * 64 * eps * norm, rtol=0
    )


@pytest.mark.skipif(not K.available(), reason="compiled kernels unavailable")
@pytest.mark.parametrize("layout", ["entry", "batch", "rows"])
def test_fused_kernel_rotations_gradcheck(layout):
    # KernelRotations: squarings written to the direct tokens' rows, then the products
    positions = torch.tensor(
        [[0.25, 0.0], [0.5, 0.0], [0.75, 0.0], [0.5, 0.5]], dtype=torch.float64
    )
    plan = rays.build_ray_plan(positions, torch.ones(4, dtype=torch.long))
    h, m, s = 1, 2, 4
    gen = randn(len(plan.base), h * m, s, s, seed=7, dtype=torch.float64) * 0.2
    series = torch.linalg.matrix_exp(gen - gen.mT)  # (N, hm, s, s): "batch"
    if layout == "entry":
        series = series.permute(2, 3, 1, 0).contiguous()  # (s, s, hm, N)
    elif layout == "rows":
        series = series.permute(1, 2, 0, 3).contiguous()  # (hm, s, N, s)
    js = torch.tensor([1, 2], dtype=torch.int32)
    leaf = series.clone().requires_grad_(True)

    def fused(x):
        return rays.KernelRotations.apply(x, js, h, m, layout, plan)

    def unfused(x):
        return rays.ray_products_plain(
            squaring.token_squarings_plain(x, js.long(), h, m, layout), plan
        )

    torch.testing.assert_close(fused(leaf), unfused(leaf), atol=1e-13, rtol=0)
    torch.autograd.gradcheck(fused, (leaf,))
    torch.autograd.gradgradcheck(fused, (leaf,))


@pytest.mark.skipif(not K.available(), reason="compiled kernels unavailable")
@pytest.mark.parametrize("size", [8, 64])
def test_kernel_squarings_write_and_read_given_rows(size):
    h, m, n = 2, 1, 5
    gen = randn(n, h * m, size, size, seed=8) * 0.1
    series = torch.linalg.matrix_exp(gen - gen.mT).contiguous()
    js = torch.tensor([0, 1, 2, 3, 1], dtype=torch.int32)
    rows = torch.tensor([6, 0, 3, 2, 5])
    plain = K.squarings_forward(series, js, h, m, "batch")
    out = torch.full((h, 7, m, size, size), 7.0)
    K.squarings_forward(series, js, h, m, "batch", out=out, rows=rows)
    torch.testing.assert_close(out[:, rows], plain)
    untouched = torch.tensor([1, 4])
    assert torch.all(out[:, untouched] == 7.0)
    grad = randn(h, 7, m, size, size, seed=9)
    d_rows = K.squarings_backward(series, js, grad, h, m, "batch", rows=rows)
    d_plain = K.squarings_backward(series, js, grad[:, rows].contiguous(), h, m, "batch")
    torch.testing.assert_close(d_rows, d_plain)


@pytest.mark.skipif(not K.available(), reason="compiled kernels unavailable")
@pytest.mark.parametrize(
    "size, dtype, layout",
    [(4, torch.float32, "entry"), (8, torch.float64, "entry"), (16, torch.float32, "batch"),
     (64, torch.float32, "batch"), (16, torch.float64, "rows"), (64, torch.float32, "rows")],
)  # fmt: skip
def test_fused_rotations_kernel_is_the_squarings_then_the_rays(size, dtype, layout):
    # one parallel region each way (kernels.rotations_forward / rotations_backward): the same
    # products as the two kernels in turn, so the same bits
    torch.manual_seed(0)
    positions = grid_positions(9, 9).to(dtype)
    bases = dense_bases(heads=3, blocks=2, size=size, dtype=dtype)
    js_all = squarings(positions, bases)
    plan = rays.build_ray_plan(positions, js_all)
    assert plan is not None
    h, m, nb = 3, 2, plan.base.shape[0]
    js = js_all[plan.base].to(torch.int32)
    blocks = randn(nb, h * m, size, size, seed=3, dtype=dtype) * 0.2
    series = blocks - blocks.mT
    if layout == "entry":
        series = series.permute(2, 3, 1, 0).contiguous()  # (s, s, hm, nb)
    elif layout == "rows":
        series = series.permute(1, 2, 0, 3).contiguous()  # (hm, s, nb, s)
    separate = torch.empty(h, plan.n, m, size, size, dtype=dtype)
    K.squarings_forward(series, js, h, m, layout, out=separate, rows=plan.base)
    K.ray_products_forward(separate, *plan.items)
    fused = torch.empty_like(separate)
    K.rotations_forward(series, js, h, m, layout, fused, plan.base, *plan.items)
    assert torch.equal(fused, separate)
    grad = randn(*separate.shape, seed=4, dtype=dtype)
    d_base = K.ray_products_backward(separate, grad, plan.base, *plan.items)
    expected = K.squarings_backward(series, js, d_base, h, m, layout)
    got = K.rotations_backward(series, js, separate, grad, plan.base, *plan.items, h, m, layout)
    assert torch.equal(got, expected)


@pytest.mark.skipif(not K.available(), reason="compiled kernels unavailable")
def test_fused_rotations_kernel_checks_its_arguments():
    h, m, s, n = 1, 1, 8, 4
    series = torch.zeros(2, h * m, s, s)
    js = torch.ones(2, dtype=torch.int32)
    out = torch.zeros(h, n, m, s, s)
    base, items = (
        torch.tensor([0, 1]),
        (torch.tensor([2, 3]), torch.tensor([1, 1]), torch.tensor([1, 2])),
    )
    K.rotations_forward(series, js, h, m, "batch", out, base, *items)  # fine
    with pytest.raises(ValueError, match="base must be a 1-D int64 tensor"):
        K.rotations_forward(series, js, h, m, "batch", out, None, *items)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\]"):
        K.rotations_forward(series, js, h, m, "batch", out, torch.tensor([0, 4]), *items)
    with pytest.raises(ValueError, match=r"dst must lie in \[0, 3\]"):
        K.rotations_forward(series, js, h, m, "batch", out, base, torch.tensor([2, 9]), *items[1:])
    with pytest.raises(ValueError, match="grad must"):
        K.rotations_backward(series, js, out, out[:, :2], base, *items, h, m, "batch")
    with pytest.raises(ValueError, match="series has"):
        K.rotations_backward(series[:1], js, out, out, base, *items, h, m, "batch")

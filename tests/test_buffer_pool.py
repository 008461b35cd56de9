"""The buffer pool for large CPU buffers (Note [buffer pool] in liere.kernels) and the series
product that draws from it: buffers are reused only once nothing refers to them, results and
gradients do not depend on the pool, the size limit holds."""

import pytest
import torch
from conftest import randn

from liere import LieRE, RotaryAttention, grid_positions
from liere import functional as F
from liere import kernels as K

MB = 2**20
needs_use_count = pytest.mark.skipif(
    K._use_count is None, reason="this torch has no storage use count: the pool is off"
)


@pytest.fixture
def pool(monkeypatch):
    """A fresh pool in place of the process-wide one, with the default limit."""
    monkeypatch.delenv("LIERE_POOL_MB", raising=False)
    fresh = K._BufferPool()
    monkeypatch.setattr(K, "_pool", fresh)
    return fresh


@needs_use_count
def test_a_buffer_is_reused_only_once_nothing_refers_to_it(pool):
    a = pool.take(torch.float32, (2 * MB,))
    ptr = a.data_ptr()
    b = pool.take(torch.float32, (2 * MB,))
    assert b.data_ptr() != ptr  # a is alive
    view = a[:10]
    del a
    c = pool.take(torch.float32, (2 * MB,))
    assert c.data_ptr() != ptr  # a view still holds a's storage
    del view, c
    d = pool.take(torch.float32, (MB, 2))
    assert d.data_ptr() == ptr and d.shape == (MB, 2) and d.is_contiguous()
    assert d._base is None  # a tensor of its own, not a view of the pool's
    assert pool.held_bytes() == 2 * 8 * MB + 4 * 2 * MB  # a/d, b and c (c freed, kept)


@needs_use_count
def test_fresh_draws_large_cpu_buffers_from_the_pool_only(pool):
    like = torch.zeros(1)
    small = K._fresh(like, 1000)
    assert pool.held_bytes() == 0 and small.shape == (1000,)
    big = K._fresh(like, 3, MB)  # 12 MB
    assert pool.held_bytes() == 12 * MB and big.shape == (3, MB)
    ptr = big.data_ptr()
    del big
    assert K._fresh(like, MB, 3).data_ptr() == ptr
    assert K._fresh(torch.zeros(1, dtype=torch.float64), 3, MB // 2).data_ptr() != ptr  # dtype


@needs_use_count
def test_buffers_above_the_cap_are_not_pooled(pool, monkeypatch):
    monkeypatch.setattr(K, "_POOL_MAX", 16 * MB)
    like = torch.zeros(1)
    assert K._fresh(like, 4, MB).shape == (4, MB) and pool.held_bytes() == 16 * MB
    assert K._fresh(like, 4, MB + 1).shape == (4, MB + 1) and pool.held_bytes() == 16 * MB


@needs_use_count
def test_pool_off_with_zero_megabytes(pool, monkeypatch):
    monkeypatch.setenv("LIERE_POOL_MB", "0")
    assert pool.take(torch.float32, (2 * MB,)) is None
    out = K._fresh(torch.zeros(1), 3, MB)
    assert out.shape == (3, MB) and pool.held_bytes() == 0


@needs_use_count
def test_pool_keeps_at_most_its_limit_least_recently_used_out(pool, monkeypatch):
    monkeypatch.setenv("LIERE_POOL_MB", "20")
    first = pool.take(torch.float32, (2 * MB,))  # 8 MB
    second = pool.take(torch.float32, (2 * MB + 1,))
    first_ptr = first.data_ptr()
    del first, second
    again = pool.take(torch.float32, (2 * MB,))  # reuses first: now the most recent
    assert again.data_ptr() == first_ptr
    del again
    pool.take(torch.float32, (2 * MB + 2,))  # 24 MB > 20: the least recently used goes
    assert pool.held_bytes() <= 20 * MB
    assert pool.take(torch.float32, (2 * MB,)).data_ptr() == first_ptr  # kept
    huge = pool.take(torch.float32, (8 * MB,))  # larger than the limit: never kept
    assert huge.shape == (8 * MB,) and pool.held_bytes() <= 20 * MB


@needs_use_count
def test_empty_cache_releases_only_buffers_nothing_uses(pool):
    kept = K._fresh(torch.zeros(1), 2 * MB)
    K._fresh(torch.zeros(1), 2 * MB + 1)  # freed at once
    assert K.pooled_bytes() == 16 * MB + 4
    assert K.empty_cache() == 8 * MB + 4
    assert K.pooled_bytes() == 8 * MB
    del kept
    assert K.empty_cache() == 8 * MB and K.pooled_bytes() == 0


def _dense_bases(heads: int, seed: int, dtype=torch.float32):
    return F.skew_symmetric(randn(heads, 2, 1, 64 * 63 // 2, seed=seed, dtype=dtype), 64) * 0.2


@needs_use_count
def test_buffers_saved_for_backward_or_returned_are_not_reused(pool, monkeypatch):
    # two forwards before either backward, every large buffer from the pool: the second must
    # not overwrite what the first returned or saved
    positions = grid_positions(14, 14)
    bases = [_dense_bases(2, seed).requires_grad_() for seed in (1, 2)]
    grads = [randn(2, 196, 1, 64, 64, seed=s) for s in (3, 4)]
    rot = [F.lie_rotations(positions, b) for b in bases]
    assert pool.held_bytes() > 0
    first = rot[0].detach().clone()
    for r, g in zip(reversed(rot), reversed(grads)):
        r.backward(g)
    pooled = [b.grad.clone() for b in bases]
    torch.testing.assert_close(rot[0].detach(), first, atol=0, rtol=0)

    monkeypatch.setenv("LIERE_POOL_MB", "0")
    for b, g, before in zip(bases, grads, (first, None)):
        b.grad = None
        r = F.lie_rotations(positions, b)
        if before is not None:
            torch.testing.assert_close(r.detach(), before, atol=0, rtol=0)
        r.backward(g)
    for b, p in zip(bases, pooled):
        torch.testing.assert_close(b.grad, p, atol=0, rtol=0)


@needs_use_count
@pytest.mark.parametrize("block", [8, 64])
def test_attention_results_do_not_depend_on_the_pool(pool, monkeypatch, block):
    torch.manual_seed(0)
    layer = RotaryAttention(
        128, 2, pos_enc=LieRE(64, 2, num_heads=2, block_size=block), num_prefix_tokens=1
    )
    x = randn(4, 197, 128, seed=7)
    positions = grid_positions(14, 14)

    def step():
        layer.zero_grad()
        out = layer(x, positions)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in layer.parameters()]

    out_pool, grads_pool = step()
    out_again, grads_again = step()  # second step: buffers now come back from the pool
    monkeypatch.setenv("LIERE_POOL_MB", "0")
    out_plain, grads_plain = step()
    for out in (out_pool, out_again):
        torch.testing.assert_close(out, out_plain, atol=0, rtol=0)
    for grads in (grads_pool, grads_again):
        for g, ref in zip(grads, grads_plain):
            torch.testing.assert_close(g, ref, atol=0, rtol=0)


@pytest.mark.parametrize("entry_major", [True, False], ids=["entry", "batch"])
@pytest.mark.parametrize("weights_grad", [False, True])
def test_series_product_matches_plain_ops_and_gradchecks(entry_major, weights_grad):
    hm, s, terms, count = 3, 4, 6, 5
    coefficients = randn(hm, s, terms * s, seed=1, dtype=torch.float64).requires_grad_()
    weights = randn(count, terms, seed=2, dtype=torch.float64).requires_grad_(weights_grad)
    out = F._SeriesProduct.apply(coefficients, weights, entry_major)
    ref = F._series_product_plain(coefficients, weights, entry_major)
    assert out.shape == ref.shape == ((s, s, hm, count) if entry_major else (count, hm, s, s))
    torch.testing.assert_close(out, ref, atol=1e-14, rtol=0)

    def fn(c, w):
        return F._SeriesProduct.apply(c, w, entry_major)

    assert torch.autograd.gradcheck(fn, (coefficients, weights))
    assert torch.autograd.gradgradcheck(fn, (coefficients, weights))


@needs_use_count
def test_status_names_the_pool_limit(monkeypatch):
    monkeypatch.setenv("LIERE_POOL_MB", "64")
    assert K.status().endswith(", buffer pool 64 MB")
    monkeypatch.setenv("LIERE_POOL_MB", "0")
    assert K.status().endswith(", buffer pool off")
    monkeypatch.setenv("LIERE_POOL_MB", "lots")  # unreadable: the default
    assert K.status().endswith(f", buffer pool {K._POOL_DEFAULT_MB} MB")

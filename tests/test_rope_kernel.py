"""The RoPE kernel (Note [RoPE kernel] in liere.speed.rope) through the public functions
``liere.ops.rope_pair`` / ``liere.ops.rope`` and the encodings, against the definition
``F.apply_rope``: values, gradients of q, k and the tables (cos, sin, and MixedRoPE's
frequencies), double backward, layouts, every fallback, and the kernel's argument checks."""

import pytest
import torch
from conftest import qk_views, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from liere import AxialRoPE, MixedRoPE, RotaryAttention, grid_positions, ops
from liere import functional as F
from liere import kernels as K

needs_kernels = pytest.mark.skipif(
    not K.available(), reason=f"compiled kernels unavailable: {K.unavailable_reason()}"
)


def tables(heads, n, pairs, dtype, seed):
    angles = randn(heads, n, pairs, seed=seed, dtype=dtype) * 3
    return angles.cos(), angles.sin()


def reference_pair(q, k, cos, sin, p):
    return tuple(
        torch.cat((t[:, :, :p], F.apply_rope(t[:, :, p:], cos, sin)), dim=2) for t in (q, k)
    )


def grads_of(fn, leaves, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    return fn(*leaves), torch.autograd.grad(fn(*leaves), leaves, upstream)


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    shared=st.booleans(),
    n=st.integers(1, 9),
    prefix=st.integers(0, 3),
    pairs=st.integers(1, 5),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_pair_matches_the_definition(b, heads, shared, n, prefix, pairs, double, seed):
    dtype = torch.float64 if double else torch.float32
    q, k = qk_views(b, heads, prefix + n, 2 * pairs, dtype, seed)
    cos, sin = tables(1 if shared else heads, n, pairs, dtype, seed + 1)
    up = [randn(*q.shape, seed=seed + 2, dtype=dtype), randn(*q.shape, seed=seed + 3, dtype=dtype)]
    fast, d_fast = grads_of(lambda *t: ops.rope_pair(*t, prefix), (q, k, cos, sin), up)
    ref, d_ref = grads_of(lambda *t: reference_pair(*t, prefix), (q, k, cos, sin), up)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-13, "rtol": 0}
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, **tol)
    for a, r in zip(d_fast, d_ref):  # q, k, and the tables summed over batch, heads, q and k
        torch.testing.assert_close(a, r, atol=tol["atol"] * 10 * b * heads, rtol=tol["rtol"])
    assert torch.equal(fast[0][:, :, :prefix], q[:, :, :prefix])


@needs_kernels
def test_rope_pair_outputs_are_laid_out_like_q():
    # q a (b, h, n, d) view of (b, n, 3, h, d): the outputs come out (b, n, h, d)-ordered, so
    # attention's output reshapes to (b, n, h*d) without a copy (Note [output layout])
    q, k = qk_views(2, 3, 5, 8, torch.float32, seed=0)
    cos, sin = tables(3, 4, 4, torch.float32, seed=1)
    for out in ops.rope_pair(q, k, cos, sin, 1):
        assert out.transpose(1, 2).is_contiguous()
    contiguous = q.contiguous()
    assert ops.rope(contiguous[:, :, 1:], cos, sin).is_contiguous()


@needs_kernels
@pytest.mark.parametrize("heads", [1, 3])
def test_rope_single_matches_the_definition_and_the_pair(heads):
    q, k = qk_views(2, 3, 6, 8, torch.float64, seed=3)
    cos, sin = tables(heads, 6, 4, torch.float64, seed=4)
    up = randn(*q.shape, seed=5, dtype=torch.float64)
    out, d_out = grads_of(ops.rope, (q, cos, sin), [up])
    ref, d_ref = grads_of(F.apply_rope, (q, cos, sin), [up])
    torch.testing.assert_close(out, ref, atol=1e-14, rtol=0)
    for a, r in zip(d_out, d_ref):
        torch.testing.assert_close(a, r, atol=1e-13, rtol=0)
    # the same arithmetic whether rotated alone or as q of a pair
    assert torch.equal(out, ops.rope_pair(q, k, cos, sin)[0])


@needs_kernels
def test_rope_pair_gradcheck_and_gradgradcheck():
    q, k = qk_views(2, 2, 4, 6, torch.float64, seed=6)
    cos, sin = tables(2, 3, 3, torch.float64, seed=7)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, cos, sin)]
    fn = lambda *t: ops.rope_pair(*t, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@needs_kernels
def test_mixed_rope_frequency_gradients_match_the_pytorch_path(monkeypatch):
    torch.manual_seed(0)
    attn = RotaryAttention(48, 4, pos_enc=MixedRoPE(12, 2, num_heads=4), num_prefix_tokens=1)
    x, pos = randn(3, 17, 48, seed=8), grid_positions(4, 4)

    def step():
        attn.zero_grad()
        out = attn(x, pos)
        out.square().sum().backward()
        return out.detach(), attn.pos_enc.freqs.grad.clone(), attn.qkv.weight.grad.clone()

    fast = step()
    monkeypatch.setattr(K, "usable", lambda *t, size, sizes=None: False)
    slow = step()
    for a, r in zip(fast, slow):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["per-sample", "strided-channels", "half", "autocast"])
def test_rope_pair_falls_back_where_the_kernel_does_not_serve(case):
    # the complex multiplication or the definition take over, with the same values
    q, k = qk_views(2, 2, 5, 8, torch.float32, seed=9)
    cos, sin = tables(2, 5, 4, torch.float32, seed=10)
    if case == "per-sample":
        cos, sin = cos.expand(2, -1, -1, -1) * 1.0, sin.expand(2, -1, -1, -1) * 1.0
    elif case == "strided-channels":
        wide = randn(2, 2, 5, 16, seed=11)
        q, k = wide[..., ::2], wide[..., 1::2]
    elif case == "half":
        q, k, cos, sin = (t.to(torch.bfloat16) for t in (q, k, cos, sin))
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.rope_pair(q, k, cos, sin)
    else:
        out = ops.rope_pair(q, k, cos, sin)
    ref = reference_pair(q, k, cos, sin, 0)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r)


@needs_kernels
def test_axial_and_mixed_rope_layers_match_with_and_without_the_kernel(monkeypatch):
    torch.manual_seed(1)
    encs = [AxialRoPE(16, 2), MixedRoPE(16, 2, num_heads=2)]
    q, k = qk_views(2, 2, 10, 16, torch.float32, seed=12)
    pos = grid_positions(3, 3)
    fast = [enc(q[:, :, 1:], k[:, :, 1:], pos) for enc in encs]
    monkeypatch.setattr(K, "usable", lambda *t, size, sizes=None: False)
    slow = [enc(q[:, :, 1:], k[:, :, 1:], pos) for enc in encs]
    for pair_fast, pair_slow in zip(fast, slow):
        for a, r in zip(pair_fast, pair_slow):
            torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


@needs_kernels
def test_rope_kernel_checks_its_arguments():
    q, k = qk_views(2, 2, 5, 8, torch.float32, seed=13)
    cos, sin = tables(2, 4, 4, torch.float32, seed=14)
    with pytest.raises(ValueError, match="pairs per row"):
        K.rope_forward(q, k, cos[..., :3].contiguous(), sin[..., :3].contiguous(), 1)
    with pytest.raises(ValueError, match="prefix tokens must equal"):
        K.rope_forward(q, k, cos, sin, 2)
    with pytest.raises(ValueError, match="must be torch.float32"):
        K.rope_forward(q, k, cos.double(), sin.double(), 1)
    with pytest.raises(ValueError, match="unit last stride"):
        wide = randn(2, 2, 5, 16, seed=15)
        K.rope_forward(wide[..., ::2], wide[..., 1::2], cos, sin, 1)
    with pytest.raises(ValueError, match="multiple of the tables"):
        c3, s3 = tables(3, 4, 4, torch.float32, seed=16)
        K.rope_forward(q, k, c3, s3, 1)
    with pytest.raises(ValueError, match="contiguous"):
        K.rope_forward(q, k, cos.transpose(0, 1).contiguous().transpose(0, 1), sin, 1)
    with pytest.raises(ValueError, match="given together"):
        K.rope_backward(q, k, cos, sin, q, None, 1, True, True)
    with pytest.raises(ValueError, match=r"\(b, h, p \+ n, 2k\)"):
        K.rope_forward(q[0], k[0], cos, sin, 1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("heads", "table_heads"), [(4, 4), (3, 1)])
@pytest.mark.parametrize("pairs", [7, 8, 16, 32])
def test_rope_tables_gradient_of_head_sized_rows(dtype, heads, table_heads, pairs):
    # rows of a whole number of vectors (8, 16, 32 pairs) take the tables' backward a vector
    # at a time; 7 pairs take it pair by pair; heads sharing one table sum into it
    b, n, prefix = 3, 6, 1
    q, k = qk_views(b, heads, prefix + n, 2 * pairs, dtype, seed=5)
    cos, sin = tables(table_heads, n, pairs, dtype, seed=6)
    up = [randn(*q.shape, seed=7, dtype=dtype), randn(*q.shape, seed=8, dtype=dtype)]
    fast, d_fast = grads_of(lambda *t: ops.rope_pair(*t, prefix), (q, k, cos, sin), up)
    ref, d_ref = grads_of(lambda *t: reference_pair(*t, prefix), (q, k, cos, sin), up)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 0}
    for a, r in zip((*fast, *d_fast), (*ref, *d_ref)):
        torch.testing.assert_close(a, r, **tol)

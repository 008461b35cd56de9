"""Encodings under ``torch.func`` transforms: ``grad`` (functional training, per-sample
gradients) gives autograd's gradients for every encoding, and ``vmap`` over the batch works for
the RoPE family. The tensors these transforms pass through a function wrap their values and
have no memory, so the CPU kernels stand aside (``liere.kernels.has_storage``) and the PyTorch
path runs."""

import pytest
import torch
from conftest import randn

from liere import AxialRoPE, ComRoPE, LieRE, MixedRoPE, grid_positions
from liere import kernels as K

ENCODINGS = {
    "axial": lambda: AxialRoPE(16, 2),
    "mixed": lambda: MixedRoPE(16, 2, num_heads=2),
    "liere2": lambda: LieRE(16, 2, num_heads=2, block_size=2),
    "liere8": lambda: LieRE(16, 2, num_heads=2, block_size=8),
    "dense": lambda: LieRE(16, 2, num_heads=2, block_size=16),
    "comrope": lambda: ComRoPE(16, 2, num_heads=2, block_size=8),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_func_grad_matches_autograd(name):
    torch.manual_seed(0)
    enc = ENCODINGS[name]()
    q, k, w = (randn(2, 2, 10, 16, seed=s) for s in (1, 2, 3))
    pos = grid_positions(3, 3)

    def loss(params, q):
        q_out, k_out = torch.func.functional_call(
            enc, params, (q, k), {"positions": pos, "num_prefix_tokens": 1}
        )
        return (q_out * w).sum() + (k_out * w.flip(-1)).sum()

    params = {n: p.detach().clone() for n, p in enc.named_parameters()}
    d_params, d_q = torch.func.grad(loss, argnums=(0, 1))(params, q)
    q_leaf = q.clone().requires_grad_()
    loss(dict(enc.named_parameters()), q_leaf).backward()
    torch.testing.assert_close(d_q, q_leaf.grad, atol=1e-5, rtol=1e-5)
    for n, p in enc.named_parameters():
        scale = p.grad.abs().max()
        torch.testing.assert_close(d_params[n], p.grad, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", ["axial", "mixed", "liere2"])
def test_vmap_over_the_batch_matches_the_batched_call(name):
    torch.manual_seed(0)
    enc = ENCODINGS[name]()
    q, k = randn(3, 2, 9, 16, seed=4), randn(3, 2, 9, 16, seed=5)
    pos = grid_positions(3, 3)
    mapped = torch.func.vmap(lambda a, b: enc(a[None], b[None], pos))(q, k)
    for got, want in zip(mapped, enc(q, k, pos)):
        torch.testing.assert_close(got[:, 0], want, atol=1e-6, rtol=1e-5)


def test_kernels_stand_aside_for_wrapped_tensors():
    x = randn(4, 4, seed=6)
    assert K.has_storage(x)
    seen = []

    def probe(t):
        seen.append((K.has_storage(t), K.usable(t, size=8)))
        return t.sum()

    torch.func.grad(probe)(x)
    torch.func.vmap(probe)(x)
    assert seen == [(False, False), (False, False)]
    if K.available():
        assert K.usable(x, size=8)

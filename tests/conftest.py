import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed), dtype=torch.float64).to(dtype)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def float_dtype(request):
    return request.param


@pytest.fixture(params=[torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def half_dtype(request):
    return request.param


def qk_views(b, h, tokens, d, dtype, seed):
    """q and k as the strided views of one qkv tensor that attention layers produce."""
    qkv = randn(b, tokens, 3, h, d, seed=seed, dtype=dtype)
    return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)


def kernels_unusable(*tensors, size, sizes=None) -> bool:
    """Stand-in for ``liere.kernels.usable`` that sends everything to the PyTorch path."""
    return False


def use_pytorch_path(monkeypatch) -> None:
    from liere import kernels

    monkeypatch.setattr(kernels, "usable", kernels_unusable)


@pytest.fixture(params=["kernels", "pytorch"])
def both_paths(request, monkeypatch):
    """Run a test with the compiled kernels (when built) and again on the PyTorch path."""
    if request.param == "pytorch":
        use_pytorch_path(monkeypatch)
    return request.param


def assert_fast_matches_reference(axes, block, q, k, positions, upstream):
    """LieRE on its fast path against the same weights on torch.linalg.matrix_exp: outputs and
    weight gradients of ``sum((q' + 2 k') * upstream)``, within the float32 rounding that
    grows with the generator norm."""
    from liere import LieRE

    torch.manual_seed(0)
    heads, d = q.shape[1], q.shape[-1]
    fast = LieRE(d, axes, num_heads=heads, block_size=block)
    ref = LieRE(d, axes, num_heads=heads, block_size=block)
    ref.load_state_dict(fast.state_dict())
    ref.exp_method = "matrix_exp"
    outs, grads = [], []
    for enc in (fast, ref):
        q_out, k_out = enc(q, k, positions)
        ((q_out + 2 * k_out) * upstream).sum().backward()
        outs.append(q_out.detach())
        grads.append(enc.weight.grad.clone())
    scale = max(1.0, fast.generator_norm(positions))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5 * scale, rtol=1e-4)

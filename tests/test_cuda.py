"""CUDA: the same results as on CPU, and device moves handled (skipped without a GPU)."""

import pytest
import torch
from conftest import randn

from liere import AxialRoPE, LieRE, MixedRoPE, RotaryAttention, grid_positions
from liere.models import VisionTransformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

FACTORIES = {
    "liere8": lambda: LieRE(64, 2, num_heads=4, block_size=8),
    "liere64": lambda: LieRE(64, 2, num_heads=4, block_size=64),
    "liere2": lambda: LieRE(64, 2, num_heads=4, block_size=2),
    "mixed": lambda: MixedRoPE(64, 2, num_heads=4),
    "axial": lambda: AxialRoPE(64, 2),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_matches_cpu_in_values_and_gradients(name, per_sample):
    torch.manual_seed(0)
    cpu = FACTORIES[name]()
    gpu = FACTORIES[name]()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    positions = grid_positions(7, 7) * 2
    if per_sample:
        positions = positions.expand(3, -1, -1) + randn(3, 49, 2, seed=5) * 0.1
    q, k, up = randn(3, 4, 49, 64, seed=1), randn(3, 4, 49, 64, seed=2), randn(3, 4, 49, 64, seed=3)
    outs = []
    for enc, dev in ((cpu, "cpu"), (gpu, "cuda")):
        qd, kd = q.to(dev).requires_grad_(True), k.to(dev).requires_grad_(True)
        q_out, k_out = enc(qd, kd, positions.to(dev))
        ((q_out + 2 * k_out) * up.to(dev)).sum().backward()
        grads = [p.grad.cpu() for p in enc.parameters()]
        outs.append((q_out.detach().cpu(), qd.grad.cpu(), grads))
    scale = max(1.0, cpu.generator_norm(positions))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-6 * scale, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=2e-6 * scale, rtol=0)
    for g_gpu, g_cpu in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(g_gpu, g_cpu, atol=1e-4 * scale, rtol=1e-4)


def test_positions_on_another_device_raise():
    enc = LieRE(16, 2).cuda()
    q = torch.randn(1, 1, 4, 16, device="cuda")
    with pytest.raises(ValueError, match="positions are on cpu but q is on cuda"):
        enc(q, q, grid_positions(2, 2))


def test_freeze_and_tables_follow_device_moves():
    torch.manual_seed(0)
    enc = LieRE(16, 2, block_size=8).eval()
    pos = grid_positions(3, 3)
    q = randn(1, 1, 9, 16)
    with torch.no_grad():
        expected = enc(q, q, pos)[0]
        enc.freeze(pos)
        enc.cuda()
        assert enc.is_frozen and enc.frozen_rotations.is_cuda
        out = enc(q.cuda(), q.cuda(), pos.cuda())[0]
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=0)
    axial = AxialRoPE(16).cuda()
    assert axial.frequencies().is_cuda
    with torch.no_grad():
        axial(q.cuda(), q.cuda(), pos.cuda())


@pytest.mark.parametrize("pos_enc", ["liere", "rope-mixed", "rope-axial"])
def test_vit_trains_under_bf16_autocast_on_cuda(pos_enc):
    torch.manual_seed(0)
    model = VisionTransformer(
        32, 4, 10, in_channels=1, dim=64, depth=2, num_heads=4, pos_enc=pos_enc
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(16, 1, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert model(torch.randn(2, 1, 48, 48, device="cuda")).shape == (2, 10)


def test_compile_fullgraph_on_cuda():
    torch.manual_seed(0)
    attn = RotaryAttention(64, 4, pos_enc=LieRE(16, 2, num_heads=4), num_prefix_tokens=1).cuda()
    x = torch.randn(2, 17, 64, device="cuda")
    pos = grid_positions(4, 4, device="cuda")
    compiled = torch.compile(attn, fullgraph=True)
    torch.testing.assert_close(compiled(x, pos), attn(x, pos), atol=1e-4, rtol=1e-4)
    compiled(x, pos).sum().backward()

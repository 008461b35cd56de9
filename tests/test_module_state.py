"""Module plumbing: state_dict, meta init, dtype/device moves, repr, torch.compile."""

import pytest
import torch
from conftest import randn

from liere import AxialRoPE, LieRE, MixedRoPE, RotaryAttention, grid_positions

FACTORIES = {
    "liere8": lambda **kw: LieRE(16, 2, num_heads=2, block_size=8, **kw),
    "liere2": lambda **kw: LieRE(16, 2, num_heads=2, block_size=2, **kw),
    "liere-dense": lambda **kw: LieRE(16, 2, num_heads=2, block_size=16, **kw),
    "mixed": lambda **kw: MixedRoPE(16, 2, num_heads=2, **kw),
    "axial": lambda **kw: AxialRoPE(16, 2, **kw),
}


@pytest.fixture(params=sorted(FACTORIES))
def name(request):
    return request.param


def test_state_dict_holds_learnables_only(name):
    keys = set(FACTORIES[name]().state_dict())
    expected = {
        "liere8": {"weight"},
        "liere2": {"weight"},
        "liere-dense": {"weight"},
        "mixed": {"freqs"},
        "axial": set(),
    }[name]
    assert keys == expected


def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    source = FACTORIES[name]()
    torch.manual_seed(1)
    target = FACTORIES[name]()
    target.load_state_dict(source.state_dict())
    q, k = randn(1, 2, 4, 16, seed=2), randn(1, 2, 4, 16, seed=3)
    pos = grid_positions(2, 2)
    for a, b in zip(source(q, k, pos), target(q, k, pos)):
        assert torch.equal(a, b)


def test_meta_init_then_reset_parameters(name):
    enc = FACTORIES[name](device="meta")
    assert all(p.is_meta for p in enc.parameters())
    enc = enc.to_empty(device="cpu")
    enc.reset_parameters() if hasattr(enc, "reset_parameters") else None
    for p in enc.parameters():
        assert torch.isfinite(p).all()
    q = randn(1, 2, 4, 16)
    out, _ = enc(q, q, grid_positions(2, 2))
    torch.testing.assert_close(out.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=0)


def test_reset_parameters_follows_global_seed(name):
    torch.manual_seed(3)
    a = FACTORIES[name]()
    torch.manual_seed(3)
    b = FACTORIES[name]()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_to_dtype(name):
    enc = FACTORIES[name]().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in enc.parameters())
    q = randn(1, 2, 4, 16, dtype=torch.float64)
    out, _ = enc(q, q, grid_positions(2, 2, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_factory_dtype(name):
    enc = FACTORIES[name](dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in enc.parameters())


def test_extra_repr(name):
    text = repr(FACTORIES[name]())
    assert "head_dim=16" in text and "num_axes=2" in text
    if name.startswith("liere"):
        assert "block_size=" in text


@pytest.mark.parametrize("enc_name", ["liere8", "liere2", "axial"])
def test_compile_fullgraph_training_and_no_grad(enc_name):
    torch.compiler.reset()
    torch.manual_seed(0)
    attn = RotaryAttention(32, 2, pos_enc=FACTORIES[enc_name](), num_prefix_tokens=1)
    x = randn(2, 5, 32, seed=1)
    pos = grid_positions(2, 2)
    eager = attn(x, pos)
    compiled = torch.compile(attn, fullgraph=True)
    out = compiled(x, pos)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for p in attn.parameters())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, pos), eager, atol=1e-4, rtol=1e-4)

"""liere.integrations.timm: swap timm ViTs' encodings, weights kept (needs timm).

Run in the timm venv (torch 2.14.1 + torchvision 0.29.1, see .ci/run); skipped elsewhere.
"""

import re
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.eva import Eva  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from liere import LieRE, MixedRoPE  # noqa: E402
from liere.integrations.timm import TimmRotaryAttention, convert_vit  # noqa: E402
from liere.testing import assert_orthogonal  # noqa: E402


def small_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    args.update(kw)
    return VisionTransformer(**args).eval()


def small_eva(**kw):
    torch.manual_seed(0)
    args = dict(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=5,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
    )
    args.update(kw)
    return Eva(**args).eval()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: small_vit(),
        lambda: small_vit(reg_tokens=2, qkv_bias=False),
        lambda: small_vit(class_token=False, global_pool="avg", no_embed_class=True),
        lambda: small_eva(),
        lambda: small_eva(qkv_fused=False),
        lambda: small_eva(num_reg_tokens=1),
    ],
    ids=["vit", "vit-registers-nobias", "vit-noclass", "eva-rope", "eva-split-qkv", "eva-reg"],
)
def test_disabled_encoding_reproduces_the_original_exactly(factory):
    model = factory()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    convert_vit(model, pos_enc=None)
    assert all(isinstance(b.attn, TimmRotaryAttention) for b in model.blocks)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize("factory", [small_vit, small_eva], ids=["vit", "eva"])
def test_liere_swap_keeps_weights_and_adds_per_layer_generators(factory):
    model = factory(dynamic_img_size=True)
    qkv = (
        [b.attn.qkv.weight.detach().clone() for b in model.blocks] if factory is small_vit else None
    )
    convert_vit(model, "liere", block_size=8)
    encs = [b.attn.pos_enc for b in model.blocks]
    assert all(isinstance(e, LieRE) and e.num_heads == 3 and e.head_dim == 16 for e in encs)
    assert len({id(e) for e in encs}) == len(encs)
    assert model.pos_embed is None
    assert getattr(model, "rope", None) is None
    if qkv is not None:
        for block, w in zip(model.blocks, qkv):
            assert torch.equal(block.attn.qkv.weight, w)
    # prefix tokens (CLS, registers) are left unrotated
    assert model.blocks[0].attn.num_prefix_tokens == model.num_prefix_tokens
    # dynamic image sizes: the grid (and positions past 1) follow the input
    model.train()
    for size in (32, 48, 64):
        out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 5)
    out.sum().backward()
    assert all(e.weight.grad is not None and e.weight.grad.abs().sum() > 0 for e in encs)
    assert_orthogonal(encs[0], torch.rand(10, 2) * 2)


def test_positions_follow_the_input_grid():
    model = convert_vit(small_vit(dynamic_img_size=True), "rope-mixed")
    assert isinstance(model.blocks[0].attn.pos_enc, MixedRoPE)
    seen = []
    enc = model.blocks[0].attn.pos_enc
    original = enc.forward

    def spy(q, k, positions):
        seen.append(positions)
        return original(q, k, positions)

    enc.forward = spy
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 48))
    assert seen[0].shape == (4 * 6, 2)
    assert seen[0][:, 0].max() == 1.0 and seen[0][:, 1].max() == pytest.approx(5 / 3)


def test_shared_generators_and_keep_absolute():
    model = convert_vit(small_vit(), "liere", num_heads=1, keep_absolute=True)
    assert model.blocks[0].attn.pos_enc.num_heads == 1
    assert model.pos_embed is not None
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_errors():
    with pytest.raises(ValueError, match="expects a timm VisionTransformer or Eva"):
        convert_vit(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="pos_enc must be"):
        convert_vit(small_vit(), "sinusoidal")
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        convert_vit(small_vit(patch_drop_rate=0.5), "liere")


def test_readme_swap_snippet_runs():
    readme = Path(__file__).resolve().parents[2] / "docs" / "swapping.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    (snippet,) = [b for b in blocks if "convert_vit" in b]
    namespace: dict = {}
    exec(compile(snippet, "README swap snippet", "exec"), namespace)
    assert namespace["logits"].shape[-1] == 10


def test_position_augment_applies_in_training_only():
    model = convert_vit(small_vit(), "liere", position_augment=dict(shift=0.2, jitter=1.3))
    plain = convert_vit(small_vit(), "liere")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), atol=0, rtol=0)
        assert not torch.allclose(model.train()(x), plain.train()(x))
    with pytest.raises(ValueError, match="position_augment takes shift, jitter and rescale"):
        convert_vit(small_vit(), "liere", position_augment=dict(flip=1.0))


@pytest.mark.parametrize("name", ["comrope-ap", "comrope-ld", "string-cayley"])
def test_commuting_encodings_swap_in(name):
    model = convert_vit(small_vit(embed_dim=96, num_heads=3), name, block_size=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_a_given_encoding_is_copied_into_every_block():
    template = LieRE(16, 2, num_heads=3, block_size=4)
    model = convert_vit(small_vit(), template)
    encs = [block.attn.pos_enc for block in model.blocks]
    assert encs[0] is not encs[1] and encs[0] is not template
    assert torch.equal(encs[0].weight, template.weight)

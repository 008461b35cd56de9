"""liere.integrations.transformers: Hugging Face ViT, Dinov2 and DINOv3 converted in place,
weights kept; exact with pos_enc=None (own RoPE or absolute embedding included). Models are
built from small configs: nothing is downloaded."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Dinov2Config,
    Dinov2Model,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    ViTConfig,
    ViTModel,
)

from liere import LieRE  # noqa: E402
from liere.integrations.transformers import HFRotaryAttention, convert_model  # noqa: E402

SMALL = dict(
    image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3
)


def vit():
    return ViTModel(ViTConfig(intermediate_size=64, **SMALL), add_pooling_layer=False)


def dinov2():
    return Dinov2Model(Dinov2Config(mlp_ratio=2, **SMALL))


def dinov3(**kw):
    return DINOv3ViTModel(
        DINOv3ViTConfig(intermediate_size=64, num_register_tokens=2, **SMALL, **kw)
    )


MODELS = {"vit": vit, "dinov2": dinov2, "dinov3": dinov3}


def build(name, pos_enc, **kw):
    torch.manual_seed(0)
    model = MODELS[name]()
    return model if pos_enc == "original" else convert_model(model, pos_enc, **kw)


def run(model, name, x):
    kwargs = {"interpolate_pos_encoding": True} if name == "vit" else {}
    return model(x, **kwargs).last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_disabled_encoding_reproduces_the_original_exactly(name, mode):
    original, converted = build(name, "original"), build(name, None)
    original.train(mode == "train")
    converted.train(mode == "train")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)  # same dropout / augmentation draws
    expected = run(original, name, x)
    torch.manual_seed(1)
    torch.testing.assert_close(run(converted, name, x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_swap_keeps_weights_and_gives_every_layer_its_own_encoding(name):
    original = build(name, "original")
    model = build(name, "liere", block_size=4)
    attentions = [m for m in model.modules() if isinstance(m, HFRotaryAttention)]
    assert len(attentions) == 2
    assert all(isinstance(a.pos_enc, LieRE) for a in attentions)
    assert attentions[0].pos_enc is not attentions[1].pos_enc
    state, new = original.state_dict(), model.state_dict()
    for key, value in state.items():
        if "position_embeddings" in key:
            assert torch.equal(new[key], torch.zeros_like(value))  # switched off
        else:
            assert torch.equal(new[key], value), key
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    out = run(model, name, x)
    assert not torch.allclose(out, run(original.eval(), name, x), atol=1e-4)
    assert run(model, name, torch.randn(1, 3, 48, 40)).shape[1] == 1 + (name == "dinov3") * 2 + 30
    run(model.train(), name, x).sum().backward()
    assert all(a.pos_enc.weight.grad is not None for a in attentions)


def test_register_and_cls_tokens_stay_unrotated():
    model = build("dinov3", "liere", block_size=4).eval()
    attention = next(m for m in model.modules() if isinstance(m, HFRotaryAttention))
    assert attention.num_prefix_tokens == 3  # CLS + 2 registers
    calls = []
    inner = attention.pos_enc.forward

    def spy(q, k, positions, num_prefix_tokens=0):
        calls.append((q.shape[2], positions.shape[0], num_prefix_tokens))
        return inner(q, k, positions, num_prefix_tokens=num_prefix_tokens)

    attention.pos_enc.forward = spy
    run(model, "dinov3", torch.randn(1, 3, 32, 32))
    assert calls == [(3 + 16, 16, 3)]


def test_dinov3_coordinate_augmentation_maps_to_augment_positions():
    torch.manual_seed(0)
    model = convert_model(dinov3(pos_embed_jitter=2.0, pos_embed_shift=0.2), "liere", block_size=4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        eval_out = run(model.eval(), "dinov3", x)
        torch.testing.assert_close(run(model.eval(), "dinov3", x), eval_out)
        assert not torch.allclose(run(model.train(), "dinov3", x), eval_out, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="expects a Hugging Face ViTModel"):
        convert_model(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="pos_enc must be one of"):
        convert_model(vit(), "sinusoidal")


def test_a_given_encoding_is_copied_into_every_layer():
    template = LieRE(16, 2, num_heads=3, block_size=4)
    model = convert_model(vit(), template)
    encs = [m.pos_enc for m in model.modules() if isinstance(m, HFRotaryAttention)]
    assert len(encs) == 2 and encs[0] is not encs[1] and encs[0] is not template
    assert torch.equal(encs[1].weight, template.weight)

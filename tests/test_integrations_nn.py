"""liere.integrations.nn: PyTorch's own attention and transformer layers, converted in place,
weights kept; exact with pos_enc=None; never silently unrotated on the fused fast path."""

import pytest
import torch
from conftest import randn
from torch import nn

from liere import LieRE
from liere.integrations.nn import (
    RotaryMultiheadAttention,
    convert_mha,
    convert_transformer,
    using_positions,
)


def encoder(batch_first=True, layers=2, **kw):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first, **kw
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_disabled_encoding_reproduces_the_original(batch_first, mode):
    original = encoder(batch_first)
    converted = convert_transformer(encoder(batch_first), None)
    x = randn(3, 7, 32, seed=1) if batch_first else randn(7, 3, 32, seed=1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    for m in (original, converted):
        m.train(mode == "train")
    with torch.set_grad_enabled(mode != "no_grad"):
        for kwargs in (
            {},
            {"src_key_padding_mask": padding},
            {"is_causal": True, "mask": nn.Transformer.generate_square_subsequent_mask(7)},
        ):
            expected, got = original(x, **kwargs), converted(x, **kwargs)
            if "src_key_padding_mask" in kwargs and mode != "train":
                # PyTorch's fast path returns zeros at padded tokens; compare the real ones
                keep = ~padding if batch_first else ~padding.T
                expected, got = expected[keep], got[keep]
            torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_rotation_survives_the_inference_fast_path(mode):
    """nn.TransformerEncoderLayer's fused inference kernel would call the weights directly;
    the converted model must run rotated in eval and under no_grad too."""
    model = convert_transformer(encoder(), "liere", block_size=4, context_length=16).eval()
    x = randn(2, 6, 32, seed=2)
    with torch.set_grad_enabled(mode != "no_grad"):
        out = model(x)
        with using_positions(model, torch.zeros(6, 1)):  # every token at 0: no rotation
            unrotated = model(x)
        shifted = model(x.roll(1, dims=1))
    plain = convert_transformer(encoder(), None).eval()
    torch.testing.assert_close(unrotated, plain(x), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(out, unrotated, atol=1e-3)
    assert not torch.allclose(shifted.roll(-1, dims=1), out, atol=1e-3)  # positions matter


def test_weights_are_kept_and_every_layer_has_its_own_encoding():
    original = encoder()
    model = convert_transformer(encoder(), "liere", block_size=4)
    for old, new in zip(original.layers, model.layers):
        attn = new.self_attn
        assert isinstance(attn, RotaryMultiheadAttention) and attn.batch_first
        assert torch.equal(attn.in_proj_weight, old.self_attn.in_proj_weight)
        assert torch.equal(attn.out_proj.weight, old.self_attn.out_proj.weight)
    encs = [layer.self_attn.attention.pos_enc for layer in model.layers]
    assert isinstance(encs[0], LieRE) and encs[0] is not encs[1]
    loss = model(randn(2, 6, 32)).sum()
    loss.backward()
    assert all(e.weight.grad is not None for e in encs)


def test_token_index_positions_on_the_documented_scale():
    model = convert_transformer(encoder(layers=1), "liere", block_size=4, context_length=11)
    x = randn(2, 5, 32, seed=3)
    explicit = torch.arange(5.0) / 10
    with using_positions(model, explicit):
        expected = model(x)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_mha_conventions():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    rot = convert_mha(mha, None)
    x = randn(2, 5, 32, seed=4)
    bool_mask = torch.tensor([[False, False, True, True, True]] * 5)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for kwargs in (
        {},
        {"attn_mask": bool_mask},
        {"key_padding_mask": padding},
        {"attn_mask": bool_mask.float() * -1e4, "average_attn_weights": False},
    ):
        out, weights = mha(x, x, x, **kwargs)
        got, got_weights = rot(x, x, x, **kwargs)
        torch.testing.assert_close(got, out, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got_weights, weights, atol=2e-6, rtol=1e-5)
    out, none = rot(x, x, x, need_weights=False, is_causal=True)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    torch.testing.assert_close(out, mha(x, x, x, attn_mask=causal)[0], atol=2e-6, rtol=1e-5)
    assert none is None


def test_errors():
    rot = convert_mha(nn.MultiheadAttention(32, 4), "liere", block_size=4)
    with pytest.raises(
        ValueError, match="self-attention: query, key and value must have one shape"
    ):
        rot(randn(5, 2, 32), randn(3, 2, 32), randn(3, 2, 32))
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim"):
        convert_mha(nn.MultiheadAttention(32, 4, kdim=16, vdim=16))
    with pytest.raises(ValueError, match="pos_enc must be one of"):
        convert_mha(nn.MultiheadAttention(32, 4), "sinusoidal")
    with pytest.raises(ValueError, match="found no nn.TransformerEncoderLayer"):
        convert_transformer(nn.Linear(3, 3))
    model = convert_transformer(encoder(), "liere", num_axes=2, block_size=4)
    with pytest.raises(ValueError, match="pass them with `with using_positions"):
        model(randn(1, 4, 32))
    with using_positions(model, torch.rand(4, 2)):
        assert model(randn(1, 4, 32)).shape == (1, 4, 32)


def test_a_given_encoding_is_copied_into_every_layer():
    template = LieRE(8, 1, num_heads=4, block_size=4)
    model = convert_transformer(encoder(), template)
    encs = [layer.self_attn.attention.pos_enc for layer in model.layers]
    assert encs[0] is not encs[1] and encs[0] is not template
    assert torch.equal(encs[0].weight, template.weight)
    with pytest.raises(
        ValueError, match="head_dim=16, num_axes=1; this model's layers need head_dim=8"
    ):
        convert_transformer(encoder(), LieRE(16, 1))

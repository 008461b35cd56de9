import pytest
import torch
from conftest import randn

from liere import LieRE, MixedRoPE
from liere.models import POS_ENCODINGS, VisionTransformer
from liere.testing import assert_permutation_equivariant


def small_vit(**kw):
    args = dict(
        image_size=16, patch_size=4, num_classes=5, in_channels=1, dim=32, depth=2, num_heads=2
    )
    args.update(kw)
    return VisionTransformer(**args)


@pytest.mark.parametrize("pos_enc", POS_ENCODINGS)
def test_2d_forward_backward_all_encodings(pos_enc):
    torch.manual_seed(0)
    model = small_vit(pos_enc=pos_enc)
    out = model(randn(3, 1, 16, 16))
    assert out.shape == (3, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("pos_enc", POS_ENCODINGS)
def test_3d_volumes_use_three_axes(pos_enc):
    torch.manual_seed(0)
    if pos_enc == "comrope-ap":  # head_dim 16 cannot be split into 3 groups of 8x8 blocks
        with pytest.raises(ValueError, match=r"num_axes \* block_size = 24; got head_dim=16"):
            small_vit(image_size=(4, 8, 8), patch_size=(2, 4, 4), pos_enc=pos_enc)
        return
    model = small_vit(image_size=(4, 8, 8), patch_size=(2, 4, 4), pos_enc=pos_enc)
    assert model.grid_size == (2, 2, 2)
    assert model(randn(2, 1, 4, 8, 8)).shape == (2, 5)
    if pos_enc not in ("none", "absolute"):
        assert model.blocks[0].attn.pos_enc.num_axes == 3


@pytest.mark.parametrize("pos_enc", POS_ENCODINGS)
def test_other_resolutions(pos_enc):
    torch.manual_seed(0)
    model = small_vit(pos_enc=pos_enc).eval()
    assert model(randn(2, 1, 24, 32)).shape == (2, 5)
    assert model(randn(2, 1, 8, 8)).shape == (2, 5)


def test_positions_extend_past_one_at_larger_inputs():
    model = small_vit()
    assert model.positions_for((4, 4)).max() == 1.0
    assert model.positions_for((8, 8)).max() == pytest.approx(7 / 3)


def test_absolute_embedding_interpolates_and_is_exact_at_training_grid():
    torch.manual_seed(0)
    model = small_vit(pos_enc="absolute")
    assert model.absolute_embedding((4, 4)) is model.pos_embed
    big = model.absolute_embedding((8, 8))
    assert big.shape == (1, 64, 32)
    # a constant table stays constant after resizing
    with torch.no_grad():
        model.pos_embed.fill_(0.25)
    torch.testing.assert_close(model.absolute_embedding((6, 10)), torch.full((1, 60, 32), 0.25))


def test_per_layer_generators_are_distinct_and_all_train():
    """The official code's bug: later layers reuse layer 0's bases and never train."""
    torch.manual_seed(0)
    model = small_vit(depth=3, pos_enc="liere")
    encs = [block.attn.pos_enc for block in model.blocks]
    assert all(isinstance(e, LieRE) for e in encs)
    assert len({id(e.weight) for e in encs}) == 3
    assert not torch.equal(encs[0].weight, encs[1].weight)
    model(randn(2, 1, 16, 16)).sum().backward()
    for e in encs:
        assert e.weight.grad is not None and e.weight.grad.abs().sum() > 0


def test_encoding_configuration_follows_arguments():
    model = small_vit(dim=64, num_heads=4, pos_enc="liere", block_size=16)
    enc = model.blocks[0].attn.pos_enc
    assert (enc.head_dim, enc.block_size, enc.num_heads, enc.num_axes) == (16, 16, 4, 2)
    shared = small_vit(pos_enc="liere", pos_enc_kwargs={"num_heads": 1})
    assert shared.blocks[0].attn.pos_enc.num_heads == 1
    assert isinstance(small_vit(pos_enc="rope-mixed").blocks[1].attn.pos_enc, MixedRoPE)
    assert small_vit(pos_enc="none").blocks[0].attn.pos_enc is None


def test_block_is_permutation_equivariant():
    torch.manual_seed(0)
    model = small_vit(pos_enc="liere")
    x = randn(2, 1 + 16, 32, seed=1)
    assert_permutation_equivariant(
        model.blocks[0], x, model.positions_for((4, 4)), num_prefix_tokens=1
    )


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = small_vit(pos_enc="liere")
    torch.manual_seed(1)
    b = small_vit(pos_enc="liere")
    b.load_state_dict(a.state_dict())
    x = randn(2, 1, 16, 16)
    assert torch.equal(a(x), b(x))


def test_errors():
    with pytest.raises(ValueError, match="pos_enc must be one of"):
        small_vit(pos_enc="sinusoidal")
    with pytest.raises(ValueError, match="must be divisible by patch_size"):
        small_vit(image_size=18)
    with pytest.raises(ValueError, match="as many axes"):
        small_vit(image_size=(8, 8, 8), patch_size=(4, 4))
    with pytest.raises(ValueError, match="2-tuple .* 3-tuple"):
        small_vit(image_size=(8, 8, 8, 8))
    model = small_vit()
    with pytest.raises(ValueError, match="takes 2-D inputs"):
        model(randn(1, 1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"spatial size \(18, 16\) must be divisible"):
        model(randn(1, 1, 18, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, \*spatial\)"):
        model(randn(1, 3, 16, 16))


def test_grid_scaling_extends_or_rescales_larger_grids():
    model = VisionTransformer(16, 4, 3, dim=32, depth=1, num_heads=2, pos_enc="liere")
    extended = model.positions_for((8, 8))
    assert extended.max().item() == pytest.approx(7 / 3)  # training spacing 1/3
    model.grid_scaling = "rescale"
    rescaled = model.positions_for((8, 8))
    assert rescaled.min().item() == 0 and rescaled.max().item() == 1
    assert torch.equal(
        model.positions_for((4, 4)),
        extended[:16].new_tensor([[r / 3, c / 3] for r in range(4) for c in range(4)]),
    )
    # the two conventions agree on the training grid and differ elsewhere
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    out_rescaled = model(x)
    model.grid_scaling = "extend"
    assert not torch.allclose(model(x), out_rescaled)
    with pytest.raises(ValueError, match="grid_scaling must be 'extend'"):
        VisionTransformer(16, 4, 3, grid_scaling="stretch")
    model.grid_scaling = "stretch"
    with pytest.raises(ValueError, match="got 'stretch'"):
        model(x)


@pytest.mark.parametrize("pos_enc", ["rope-axial", "rope-mixed", "comrope-ap"])
def test_mean_pool_makes_exactly_relative_encodings_blind_to_absolute_position(pos_enc):
    # move every token's coordinates by the same offset: with mean pooling every score of an
    # exactly relative encoding depends on offsets only, so the logits stay put; a CLS token
    # (unrotated query, rotated keys) sees where the tokens are
    x = randn(2, 1, 24, 24, seed=3)
    moved = {}
    for pool in ("mean", "cls"):
        torch.manual_seed(0)
        model = VisionTransformer(
            24, 4, 3, in_channels=1, dim=32, depth=2, num_heads=2, pos_enc=pos_enc, pool=pool
        ).eval()
        with torch.no_grad():
            before = model(x)
            plain = model.positions_for
            model.positions_for = lambda grid, device=None, plain=plain: plain(grid, device) + 2.5
            moved[pool] = (model(x) - before).abs().max().item()
    assert moved["mean"] < 2e-6, moved
    assert moved["cls"] > 100 * moved["mean"] and moved["cls"] > 2e-5, moved


def test_mean_pool_has_no_cls_token_and_checks_its_argument():
    model = VisionTransformer(16, 4, 5, dim=32, depth=1, num_heads=2, pool="mean")
    assert model.cls_token is None and model.num_prefix_tokens == 0
    assert "cls_token" not in model.state_dict()
    assert model.forward_features(randn(2, 3, 16, 16)).shape == (2, 16, 32)
    assert model(randn(2, 3, 16, 16)).shape == (2, 5)
    assert "pool='mean'" in repr(model)
    with pytest.raises(ValueError, match="pool must be 'cls'.*got 'max'"):
        VisionTransformer(16, 4, 5, pool="max")

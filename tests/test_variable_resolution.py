"""Variable-resolution batches in the reference ViT: a list of images of different sizes is
padded to the longest sequence, padded tokens are masked out as keys, and each image's logits
equal those of running it alone."""

import pytest
import torch
from conftest import randn

from liere.models import VisionTransformer


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize(
    "pos_enc", ["liere", "absolute", "rope-axial", "rope-mixed", "comrope-ap", "string-cayley"]
)
def test_each_image_matches_running_it_alone(pos_enc, pool):
    torch.manual_seed(0)
    model = VisionTransformer(
        16, 4, 5, dim=32, depth=2, num_heads=2, pos_enc=pos_enc, block_size=4, pool=pool
    )
    model.eval()
    images = [randn(3, 16, 16, seed=1), randn(3, 24, 32, seed=2), randn(3, 8, 12, seed=3)]
    with torch.no_grad():
        batched = model(images)
        alone = torch.cat([model(img.unsqueeze(0)) for img in images])
    assert batched.shape == (3, 5)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_gradients_match_running_each_image_alone():
    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 5, dim=32, depth=1, num_heads=2, pos_enc="liere", block_size=4)
    images = [randn(3, 16, 16, seed=1), randn(3, 8, 24, seed=2)]
    model(images).sum().backward()
    batched = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for img in images:
        model(img.unsqueeze(0)).sum().backward()
    for got, expected in zip(batched, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_volumes_of_different_sizes():
    torch.manual_seed(0)
    model = VisionTransformer((4, 8, 8), (2, 4, 4), 3, dim=32, depth=1, num_heads=2)
    model.eval()
    volumes = [randn(3, 4, 8, 8, seed=1), randn(3, 6, 8, 12, seed=2)]
    with torch.no_grad():
        alone = torch.cat([model(v.unsqueeze(0)) for v in volumes])
        torch.testing.assert_close(model(volumes), alone, atol=1e-5, rtol=1e-5)


def test_token_mask_marks_the_padding():
    model = VisionTransformer(16, 4, 5, dim=32, depth=1, num_heads=2)
    mask = model.token_mask([randn(3, 16, 16), randn(3, 8, 8)])
    assert mask.shape == (2, 17)
    assert mask[0].all() and mask[1, :5].all() and not mask[1, 5:].any()
    features = model.forward_features([randn(3, 16, 16), randn(3, 8, 8)])
    assert features.shape == (2, 17, 32)
    mean_pooled = VisionTransformer(16, 4, 5, dim=32, depth=1, num_heads=2, pool="mean")
    mask = mean_pooled.token_mask([randn(3, 16, 16), randn(3, 8, 8)])
    assert mask.shape == (2, 16) and mask[1, :4].all() and not mask[1, 4:].any()


def test_list_input_errors():
    model = VisionTransformer(16, 4, 5, dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"one image \(C, H, W\) per sample.*item 1 has shape"):
        model([randn(3, 16, 16), randn(1, 3, 16, 16)])
    with pytest.raises(ValueError, match="item 0 has 1 channels; this model takes 3"):
        model([randn(1, 16, 16)])
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model([randn(3, 16, 15)])
    with pytest.raises(ValueError, match="non-empty list"):
        model([])

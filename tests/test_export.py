"""torch.export and ONNX export (with frozen rotations) match eager."""

import pytest
import torch

from liere.models import VisionTransformer


def vit(image_size=16, patch_size=4, pos_enc="liere", **kw):
    torch.manual_seed(0)
    return VisionTransformer(
        image_size,
        patch_size,
        5,
        in_channels=1,
        dim=32,
        depth=2,
        num_heads=2,
        pos_enc=pos_enc,
        **kw,
    ).eval()


@pytest.mark.parametrize("pos_enc, block", [("liere", 8), ("liere", 16), ("rope-mixed", 8)])
def test_torch_export_matches_eager(pos_enc, block):
    model = vit(pos_enc=pos_enc, block_size=block)
    x = torch.randn(2, 1, 16, 16)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_3d():
    model = vit(image_size=(4, 8, 8), patch_size=(2, 4, 4))
    x = torch.randn(2, 1, 4, 8, 8)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_frozen_model_matches_unfrozen_and_other_sizes_still_work():
    model = vit()
    x, big = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 24, 24)
    expected, expected_big = model(x), model(big)
    model.freeze_rotations()
    assert all(enc.is_frozen for enc in model.rotary_encodings())
    assert torch.equal(model(x), expected)
    torch.testing.assert_close(model(big), expected_big)
    model.unfreeze_rotations()
    assert not any(enc.is_frozen for enc in model.rotary_encodings())


@pytest.mark.parametrize("block", [8, 2])
def test_onnx_export_with_frozen_rotations_matches_onnxruntime(tmp_path, block):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = vit(block_size=block).freeze_rotations()
    x = torch.randn(3, 1, 16, 16)
    path = tmp_path / "vit_liere.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-5, rtol=1e-5)

"""ONNX export of the image tower: same retrieval features as the model (within 1e-4), any batch size."""

import json

import pytest
import torch

from ccafl_hf import create_tiny_model
from ccafl_hf.retrieval.onnx import export_onnx, verify_onnx

onnxruntime = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime): the parity check cannot run"
)
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx): torch.onnx.export needs it")


@pytest.fixture(params=["vit", "rn50"])
def trained_like_model(request):
    """A tiny model (each image tower) whose BN-neck has non-trivial running statistics, left in training mode."""
    model, processor = create_tiny_model(seed=1, backbone=request.param)
    with torch.no_grad():
        model.neck.running_mean.normal_(0, 0.5)
        model.neck.running_var.uniform_(0.5, 2.0)
        model.neck.weight.uniform_(0.5, 1.5)
    return model.train(), processor


def test_onnx_features_match_the_model(trained_like_model, tmp_path):
    model, processor = trained_like_model
    path = export_onnx(model, tmp_path / "onnx" / "ccafl.onnx", image_processor=processor)
    assert model.training, "export leaves the model's mode as it was"

    difference = verify_onnx(model, path, batch_sizes=(1, 3, 7))
    assert difference < 1e-4
    assert model.training

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "pixel_values" and inp.shape[1:] == [3, 64, 32] and isinstance(inp.shape[0], str)
    assert out.name == "reid_features" and out.shape[1] == model.reid_feature_dim
    x = torch.randn(4, 3, 64, 32)
    features = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])
    torch.testing.assert_close(features.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(features, model.eval().get_reid_features(x), atol=1e-4, rtol=0)

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["image_size"]) == [64, 32] and props["feature_dim"] == str(model.reid_feature_dim)
    assert json.loads(props["image_mean"]) == pytest.approx(list(processor.image_processor.image_mean))


def test_onnx_rn50_projection_feature_goes_through_the_attention_pool(tmp_path):
    """With ``reid_feature="projection"`` the exported graph contains the RN50 attention pool."""
    model, _ = create_tiny_model(seed=1, backbone="rn50")
    model.config.reid_feature = "projection"
    path = export_onnx(model.eval(), tmp_path / "rn50-projection.onnx")
    assert model.reid_feature_dim == model.projection_dim
    assert {"Softmax", "Einsum"} & {node.op_type for node in onnx.load(str(path)).graph.node}
    assert verify_onnx(model, path, batch_sizes=(1, 3)) < 1e-4


def test_verify_onnx_detects_a_different_model(tmp_path):
    model, _ = create_tiny_model(seed=0)
    other, _ = create_tiny_model(seed=2)
    path = export_onnx(model.eval(), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="differ from the model's"):
        verify_onnx(other.eval(), path)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        verify_onnx(model, tmp_path / "missing.onnx")

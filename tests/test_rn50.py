"""The RN50 tower: open_clip conversion (equality with open_clip), last stride 1 and the stored
attention-pool grid, round trips, bad inputs."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel

from ccafl_hf import CCAFLConfig, CCAFLModel, create_tiny_model
from ccafl_hf.modeling_ccafl_resnet import CCAFLGeMPooling, resize_attention_pool_positions

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is a test dependency (pip install -e .[test])")


def _save_open_clip_folder(model, model_cfg: dict, folder: Path) -> Path:
    """The Hub folder format of open_clip checkpoints (as on timm/resnet50_clip.openai)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return folder


@pytest.fixture(scope="module")
def open_clip_rn50(tmp_path_factory):
    """A random open_clip RN50 (QuickGELU, as OpenAI's) with non-trivial BatchNorm statistics, saved
    in the Hub folder format with the tiny tokenizer."""
    from ccafl_hf import build_tiny_tokenizer

    torch.manual_seed(0)
    model_cfg = {**open_clip.get_model_config("RN50"), "quick_gelu": True}
    model = open_clip.CLIP(**model_cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        model.logit_scale.fill_(4.0)
    folder = _save_open_clip_folder(model, model_cfg, tmp_path_factory.mktemp("hub") / "rn50")
    build_tiny_tokenizer().save_pretrained(folder)
    return model, folder


def _token_ids(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """CLIP-style token ids [B, 77]: start, random words, end-of-text (the largest id), zero padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    ids[:, 0] = 49406
    for row in range(batch):
        length = 3 + row * 4
        ids[row, 1:1 + length] = torch.randint(1, 49000, (length,), generator=generator)
        ids[row, 1 + length] = 49407
    return ids


def test_converted_rn50_equals_open_clip(open_clip_rn50):
    reference, folder = open_clip_rn50
    model = CCAFLModel.from_clip(folder, image_size=(224, 224), last_stride=2).eval()
    assert model.config.is_resnet and model.config.vision_config.last_stride == 2
    assert model.config.text_config.hidden_size == 512 and model.config.projection_dim == 1024
    assert model.config.text_config.max_position_embeddings == 77
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = _token_ids(batch=2)
    with torch.no_grad():
        image = model.get_image_features(pixels).pooler_output
        text = model.get_text_features(ids).pooler_output
        assert (image - reference.encode_image(pixels)).abs().max() <= 1e-5
        assert (text - reference.encode_text(ids)).abs().max() <= 1e-5
        torch.testing.assert_close(model.logit_scale, reference.logit_scale)
        # CLIP's forward: image-text logits of the same embeddings
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image
        expected = reference.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
        # the alignment feature is the attention pool's output, the retrieval feature GeM -> neck -> L2
        out = model.get_reid_outputs(pixels)
        torch.testing.assert_close(out.alignment_features, image)
        gem = out.last_hidden_state.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        torch.testing.assert_close(out.pooled_features, gem, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.reid_features, F.normalize(model.neck(gem), dim=-1), atol=1e-6, rtol=1e-5)
        assert out.reid_features.shape == (2, 2048)


def test_default_last_stride_one_and_stored_grid(open_clip_rn50):
    """256x128, last stride 1: 16x8 layer4 map, 16x8+1 attention-pool positions resized bilinearly, once."""
    from ccafl_hf.pipeline import ModelArguments, build_model

    reference, folder = open_clip_rn50
    model, processor = build_model(ModelArguments(model_name_or_path=str(folder), image_size=[256, 128]))
    model.eval()
    assert model.config.vision_config.last_stride == 1
    pool = model.vision_model.attention_pool
    assert pool.position_embedding.shape == (16 * 8 + 1, 2048)
    source = reference.visual.attnpool.positional_embedding.detach()
    grid = source[1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(16, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pool.position_embedding[1:].detach(), direct.permute(0, 2, 3, 1).reshape(128, -1))
    torch.testing.assert_close(pool.position_embedding[0].detach(), source[0])
    # layer4's first block does not down-sample: no average pool in the block or its shortcut
    first = model.vision_model.stages[3][0]
    assert isinstance(first.pool, torch.nn.Identity) and isinstance(first.downsample.pool, torch.nn.Identity)
    with torch.no_grad():
        out = model.get_reid_outputs(torch.randn(1, 3, 256, 128))
    assert out.last_hidden_state.shape == (1, 2048, 16, 8)
    # the folder's tokenizer comes along; the processor resizes to the ReID size
    assert processor.tokenizer.tokenize("a photo of a person") == ["a</w>", "photo</w>", "of</w>", "a</w>", "person</w>"]
    assert processor.image_processor.size == {"height": 256, "width": 128}


def test_rn50_round_trip_auto_model(tmp_path):
    model, processor = create_tiny_model(seed=4, backbone="rn50")
    with torch.no_grad():  # non-trivial BatchNorm statistics and GeM exponent
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
        model.vision_model.gem.p.fill_(2.5)
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CCAFLModel) and reloaded.config.is_resnet
    pixels = torch.randn(3, 3, *model.config.image_size)
    with torch.no_grad():
        for name in ("reid_features", "alignment_features", "pooled_features"):
            torch.testing.assert_close(getattr(reloaded.get_reid_outputs(pixels), name),
                                       getattr(model.get_reid_outputs(pixels), name), rtol=0, atol=0)
    assert reloaded.vision_model.gem.p.item() == 2.5
    assert not reloaded.neck.bias.requires_grad and "neck.bias" not in dict(reloaded.named_parameters())


def test_gem_pooling_matches_the_formula():
    pool = CCAFLGeMPooling(p=3.0)
    x = torch.rand(2, 5, 4, 3)
    expected = torch.stack([torch.stack([(x[b, c] ** 3).mean() ** (1 / 3) for c in range(5)]) for b in range(2)])
    torch.testing.assert_close(pool(x), expected)
    assert pool.p.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(pool((x * 100).bfloat16())).all()


def test_attention_pool_equals_multi_head_attention_with_gradients():
    """The single-query form (no key/value projection of the tokens) against torch's multi-head
    attention over projected keys and values, outputs and every gradient."""
    from ccafl_hf.modeling_ccafl_resnet import CCAFLResNetAttentionPool

    torch.manual_seed(0)
    config = CCAFLConfig(vision_config={"model_type": "ccafl_resnet_vision", "width": 8, "layers": [1, 1, 1, 1],
                                        "num_attention_heads": 4, "output_dim": 24},
                        projection_dim=24).vision_config
    pool = CCAFLResNetAttentionPool(config, (4, 2)).double()  # float64: the two forms round differently
    with torch.no_grad():
        for parameter in pool.parameters():
            parameter.normal_(0, 0.3)
    feature_map = torch.randn(3, config.hidden_size, 4, 2, dtype=torch.float64, requires_grad=True)

    tokens = feature_map.flatten(2).permute(2, 0, 1)  # [L, B, C], as CLIP's AttentionPool2d
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + pool.position_embedding[:, None]
    expected, _ = F.multi_head_attention_forward(
        tokens[:1], tokens, tokens, config.hidden_size, pool.num_heads,
        None, torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.out_proj.weight, pool.out_proj.bias, use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        need_weights=False,
    )
    expected = expected.squeeze(0)
    weights = torch.randn_like(expected)
    inputs = [feature_map, *pool.parameters()]
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    out = pool(feature_map)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert all(g is not None for g in grads)  # every parameter takes part (DDP needs it)
    for name, got, want in zip(["feature_map", *(n for n, _ in pool.named_parameters())], grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=name)


def test_attention_pool_position_resize_keeps_square_grid():
    weight = torch.randn(1 + 49, 8)
    assert resize_attention_pool_positions(weight, (7, 7)) is weight
    assert resize_attention_pool_positions(weight, (16, 8)).shape == (129, 8)


def _rn50_config(**fields):
    return CCAFLConfig(vision_config={"model_type": "ccafl_resnet_vision", **fields}, projection_dim=1024)


def test_config_validation():
    with pytest.raises(ValueError, match="last_stride must be 1 .* or 2"):
        _rn50_config(last_stride=3)
    with pytest.raises(ValueError, match=r"image_size \(height=250, width=128\) gives no integer layer4 grid"):
        CCAFLConfig(vision_config={"model_type": "ccafl_resnet_vision"}, projection_dim=1024, image_size=(250, 128))
    with pytest.raises(ValueError, match="down-samples by 32"):  # CLIP's stride: 256x128 is fine, 240x112 is not
        CCAFLConfig(vision_config={"model_type": "ccafl_resnet_vision", "last_stride": 2}, projection_dim=1024,
                    image_size=(240, 112))
    with pytest.raises(ValueError, match="projection_dim"):
        CCAFLConfig(vision_config={"model_type": "ccafl_resnet_vision"}, projection_dim=512)
    config = _rn50_config()
    assert config.patch_grid == (16, 8) and config.vision_config.hidden_size == 2048
    assert CCAFLConfig.from_dict(config.to_dict()).vision_config.layers == (3, 4, 6, 3)


def _fake_open_clip_folder(folder: Path, model_cfg: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({"logit_scale": torch.zeros(())}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return folder


@pytest.mark.parametrize("name, found", [("RN101", "found RN101 (ResNet layers [3, 4, 23, 3], width 64)"),
                                         ("ViT-L-14", "found ViT (width 1024, 24 layers, patch 14)")])
def test_other_architecture_gives_one_line(tmp_path, name, found):
    folder = _fake_open_clip_folder(tmp_path / name, open_clip.get_model_config(name))
    with pytest.raises(ValueError) as info:
        CCAFLModel.from_clip(folder)
    message = str(info.value)
    assert "\n" not in message and "expected an open_clip RN50" in message and found in message


def test_train_script_names_the_architecture_in_one_line(tmp_path, capsys):
    from ccafl_hf.commands import train_main

    folder = _fake_open_clip_folder(tmp_path / "rn101", open_clip.get_model_config("RN101"))
    assert train_main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"),
                       "--dataset_options", '{"num_train_identities": 4, "num_test_identities": 2}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected an open_clip RN50" in err[0] and "found RN101" in err[0]


def test_pickled_checkpoints_are_refused(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickled checkpoint was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    torchscript = tmp_path / "RN50.pt"
    torchscript.write_bytes(b"not opened")
    with pytest.raises(ValueError, match="RN50.pt: a pickled checkpoint .* open_clip_model.safetensors"):
        CCAFLModel.from_clip(torchscript)
    folder = tmp_path / "rn50-bin"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("RN50")}))
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match="only pickled weights .*open_clip_pytorch_model.bin"):
        CCAFLModel.from_clip(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not opened")
    (folder / "open_clip_config.json").unlink()
    with pytest.raises(ValueError, match="never unpickles"):
        CCAFLModel.from_clip(folder)


def test_offline_not_cached_gives_the_clip_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local-dir") as info:
        CCAFLModel.from_clip("timm/resnet50_clip.openai-not-cached")
    assert "\n" not in str(info.value) and info.value.__cause__ is None


def test_resnet_fields_are_refused_for_vit_weights():
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64},
        vision_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64,
                       "patch_size": 8, "image_size": 32},
        projection_dim=16,
    ))
    with pytest.raises(ValueError, match="last_stride only applies to a ResNet"):
        CCAFLModel.from_clip(clip, image_size=(32, 32), last_stride=2)

"""CCAFLConfig / CCAFLModel: round trips, non-square grids, Auto classes, remote code, CLIP conversion."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPConfig, CLIPModel

from ccafl_hf import CCAFLConfig, CCAFLModel, create_tiny_model, resize_position_embeddings, tiny_config


def _pixels(config, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *config.image_size, generator=generator)


def test_save_load_round_trip_identical_features(tiny_model, tmp_path):
    model, processor = tiny_model
    pixels = _pixels(model.config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, CCAFLModel)
    with torch.no_grad():
        expected = model.get_reid_features(pixels)
        torch.testing.assert_close(reloaded.get_reid_features(pixels), expected, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = reloaded.get_reid_features(pixels)
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16.float(), expected, atol=0.05, rtol=0)
    # position embeddings are stored for the ReID grid, nothing to interpolate at load
    grid = model.config.patch_grid
    assert reloaded.vision_model.embeddings.position_embedding.weight.shape[0] == 1 + grid[0] * grid[1]


def test_processor_saved_with_reid_size(tiny_model, tmp_path):
    from PIL import Image

    model, processor = tiny_model
    processor.save_pretrained(tmp_path)
    image = Image.new("RGB", (50, 170), color=(200, 10, 10))
    for loaded in (AutoImageProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path).image_processor):
        pixels = loaded(image, return_tensors="pt")["pixel_values"]
        assert tuple(pixels.shape[-2:]) == tuple(model.config.image_size)
    tokenizer = AutoProcessor.from_pretrained(tmp_path).tokenizer
    ids = tokenizer(model.config.prompt_text)["input_ids"]
    placeholder = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(model.config.prompt_placeholder))
    assert len(placeholder) == 1 and ids.count(placeholder[0]) == model.config.num_prompt_tokens


@pytest.mark.parametrize("image_size", [(64, 32), (48, 24), (32, 64)])
def test_non_square_forward_and_outputs(image_size):
    model, _ = create_tiny_model(image_size=image_size)
    model.eval()
    out = model.get_reid_outputs(_pixels(model.config, batch=2))
    hidden, proj = model.config.vision_config.hidden_size, model.config.projection_dim
    assert out.reid_features.shape == (2, hidden)
    assert out.pooled_features.shape == (2, hidden) and out.neck_features.shape == (2, hidden)
    assert out.alignment_features.shape == (2, proj)
    torch.testing.assert_close(out.reid_features.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="expects"):
        model.get_reid_outputs(torch.randn(1, 3, 32, 32) if image_size != (32, 32) else torch.randn(1, 3, 64, 64))


def test_resized_position_embeddings_equal_direct_bicubic():
    torch.manual_seed(0)
    side, dim = 4, 8
    weight = torch.randn(1 + side * side, dim)
    resized = resize_position_embeddings(weight, (8, 4))
    grid = weight[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(8, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(-1, dim)
    torch.testing.assert_close(resized[1:], direct)
    torch.testing.assert_close(resized[0], weight[0])
    assert resize_position_embeddings(weight, (side, side)) is weight


def _tiny_clip(image_size=32):
    config = CLIPConfig(
        text_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64,
                     "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 97, "eos_token_id": 98,
                     "pad_token_id": 98},
        vision_config={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64,
                       "patch_size": 8, "image_size": image_size},
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def test_converted_clip_keeps_clip_embeddings_on_square_input():
    clip = _tiny_clip()
    model = CCAFLModel.from_clip(clip, image_size=(32, 32)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(0, 97, (2, 7))
    ids[:, -1] = 98
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixels).pooler_output,
                                   clip.get_image_features(pixels).pooler_output)
        torch.testing.assert_close(model.get_text_features(ids).pooler_output,
                                   clip.get_text_features(ids).pooler_output)
        # the prompt-embedding text path is CLIP's text tower on embeddings
        embeds = clip.text_model.embeddings.token_embedding(ids)
        torch.testing.assert_close(model.encode_prompt_embeddings(embeds, torch.full((2,), 6)),
                                   clip.get_text_features(ids).pooler_output)


def test_forward_keeps_clips_contract():
    """model(input_ids=..., pixel_values=...) gives CLIP's image-text logits; images only give the ReID outputs."""
    clip = _tiny_clip()
    model = CCAFLModel.from_clip(clip, image_size=(32, 32)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(0, 97, (2, 7))
    ids[:, -1] = 98
    with torch.no_grad():
        ours, theirs = model(input_ids=ids, pixel_values=pixels), clip(input_ids=ids, pixel_values=pixels)
        for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
            torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=0, atol=1e-6)
        assert ours.logits_per_image.shape == (3, 2)
        image_only = model(pixel_values=pixels)
        torch.testing.assert_close(image_only[0], model.get_reid_features(pixels), rtol=0, atol=0)
        torch.testing.assert_close(image_only.alignment_features, clip.get_image_features(pixels).pooler_output)


def test_prompt_embeddings_raise_no_future_warning(tiny_model):
    model, processor = tiny_model
    ids = processor.tokenizer([model.config.prompt_text], return_tensors="pt")["input_ids"]
    embeds = model.text_model.embeddings.token_embedding(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        features = model.encode_prompt_embeddings(embeds, torch.tensor([ids.shape[1] - 1]))
    torch.testing.assert_close(features, model.get_text_features(ids).pooler_output)


def test_converted_clip_resizes_position_embeddings_once(tmp_path):
    clip = _tiny_clip()
    model = CCAFLModel.from_clip(clip, image_size=(64, 32))
    square = clip.vision_model.embeddings.position_embedding.weight
    expected = resize_position_embeddings(square.detach(), (8, 4))
    torch.testing.assert_close(model.vision_model.embeddings.position_embedding.weight.detach(), expected)
    model.save_pretrained(tmp_path)
    reloaded = CCAFLModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.vision_model.embeddings.position_embedding.weight, expected)


def test_from_clip_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local-dir") as info:
        CCAFLModel.from_clip("openai/clip-vit-base-patch16-not-cached")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by the vision patch size"):
        tiny_config(image_size=(60, 32))
    with pytest.raises(ValueError, match="reid_feature"):
        tiny_config(reid_feature="cls")
    with pytest.raises(ValueError, match="prompt_template"):
        tiny_config(prompt_template="A photo of a person.")
    config = tiny_config(num_prompt_tokens=2)
    assert config.prompt_text == "A photo of a X X person."
    assert CCAFLConfig.from_dict(config.to_dict()).image_size == (64, 32)


def test_bn_neck_bias_frozen_and_reid_feature_choice():
    model, _ = create_tiny_model(reid_feature="pooled")
    assert not model.neck.bias.requires_grad
    model.eval()
    out = model.get_reid_outputs(_pixels(model.config))
    torch.testing.assert_close(out.reid_features, F.normalize(out.pooled_features, dim=-1))


@pytest.mark.parametrize("backbone", ["vit", "rn50"])
def test_trust_remote_code_without_package(backbone, tmp_path):
    from PIL import Image

    model, processor = create_tiny_model(seed=0, backbone=backbone)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_ccafl.py").exists()
    assert (tmp_path / "ckpt" / "modeling_ccafl_resnet.py").exists()
    pixels = _pixels(model.config)
    torch.save(pixels, tmp_path / "pixels.pt")
    image = Image.fromarray((torch.rand(70, 30, 3) * 255).byte().numpy())
    image.save(tmp_path / "person.png")
    with torch.no_grad():
        torch.save(model.get_reid_features(pixels), tmp_path / "expected.pt")
        image_pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        torch.save(model.get_reid_features(image_pixels), tmp_path / "expected_image.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["ccafl_hf"] = None  # this process cannot import the package (even when pip-installed)
        import torch
        from PIL import Image
        from transformers import AutoModel, pipeline
        torch.set_num_threads({torch.get_num_threads()})  # same reduction order as the parent: bitwise equal
        model = AutoModel.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            features = model.get_reid_features(torch.load({str(tmp_path / 'pixels.pt')!r}))
        torch.testing.assert_close(features, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=0, atol=0)
        extractor = pipeline("image-feature-extraction", model={str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
        out = extractor(Image.open({str(tmp_path / 'person.png')!r}), return_tensors=True)
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected_image.pt')!r}), rtol=0, atol=1e-5)
        print("OK", type(model).__name__, type(model.vision_model).__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    # run from a folder where ccafl_hf is not importable; `-I` ignores user site and PYTHONPATH
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    tower = "CCAFLResNetVisionModel" if backbone == "rn50" else "CLIPVisionModel"
    assert f"OK CCAFLModel {tower}" in result.stdout


def test_blocked_package_import_really_fails():
    """The remote-code tests block `ccafl_hf` with `sys.modules[...] = None`; check that this blocks it."""
    script = 'import sys; sys.modules["ccafl_hf"] = None\ntry:\n    import ccafl_hf\nexcept ImportError:\n    print("blocked")'
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "blocked"


def test_saved_remote_code_is_the_modelling_files_only(tiny_model, tmp_path):
    """The conversion (from_clip, open_clip reading, Hub look-ups) lives outside the modelling file, so a saved
    model ships configuration_ccafl.py, modeling_ccafl.py and modeling_ccafl_resnet.py, nothing more."""
    model, _ = tiny_model
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == [
        "configuration_ccafl.py", "modeling_ccafl.py", "modeling_ccafl_resnet.py"]


def test_interpolate_pos_encoding_is_refused_not_ignored(tiny_model):
    model, _ = tiny_model
    pixels = _pixels(model.config, batch=1)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True is not supported"):
        model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
    assert model.vision_model(pixel_values=pixels).last_hidden_state.shape[0] == 1

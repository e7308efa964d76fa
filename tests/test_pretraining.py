"""The pre-trained tiny CLIP (the demo's starting point): captions, tokenizer, contrastive loss,
pre-training, cache, and its use as ``--model_name_or_path tiny-pretrained``."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers.models.clip import modeling_clip

from ccafl_hf import CCAFLModel, build_tiny_tokenizer
from ccafl_hf.data.synthetic import (
    CAPTION_WORDS,
    colour_name,
    describe_look,
    identity_caption,
    identity_look,
)
from ccafl_hf.pipeline import ModelArguments, build_model
from ccafl_hf.tiny import TINY_VOCAB_WORDS
from ccafl_hf.tiny.pretraining import (
    PRETRAINING_FILE,
    SHIPPED_WEIGHTS,
    TinyCLIPPretrainingConfig,
    clip_contrastive_loss,
    default_pretrained_root,
    load_tiny_pretrained,
    pretrain_tiny_clip,
    read_weights_metadata,
    rebuild_shipped_weights,
    tiny_pretrained_architecture,
)

SMALL_RECIPE = TinyCLIPPretrainingConfig(num_identities=24, num_cameras=3, steps=200, batch_size=16,
                                         learning_rate=2e-3, warmup_steps=5)


@pytest.mark.parametrize(
    ("rgb", "name"),
    [((230, 20, 20), "red"), ((20, 40, 200), "blue"), ((30, 180, 40), "green"), ((240, 240, 235), "white"),
     ((25, 25, 30), "black"), ((128, 128, 128), "grey"), ((180, 160, 110), "beige"), ((100, 70, 45), "brown"),
     ((230, 220, 30), "yellow"), ((150, 40, 200), "purple")],
)
def test_colour_names(rgb, name):
    assert colour_name(np.asarray(rgb)) == name


def test_captions_describe_the_look_with_known_words():
    captions = [identity_caption(1, pid) for pid in range(1, 400)]
    words = set(re.findall(r"[a-z]+", " ".join(captions)))
    assert words == set(CAPTION_WORDS)  # every word is in the vocabulary, and every listed word is used
    assert len(set(captions)) > 390  # captions tell people apart
    look = identity_look(1, 7)
    caption = describe_look(look)
    assert f"{colour_name(look.top)} top" in caption and f"{colour_name(look.shoes)} shoes" in caption
    assert caption == identity_caption(1, 7)  # a function of (seed, pid)


def test_tiny_tokenizer_keeps_every_word_whole():
    # BPE merges of one word must not split another (e.g. "horizontal" taking "h o" from "photo")
    words = (*TINY_VOCAB_WORDS, *CAPTION_WORDS)
    tokenizer = build_tiny_tokenizer(words)
    assert all(len(tokenizer.tokenize(word)) == 1 for word in words)
    assert tokenizer.tokenize("A photo of a X X X X person.") == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "x</w>", "x</w>", "x</w>", "x</w>", "person</w>", ".</w>"]
    assert len(tokenizer.tokenize("zebra")) > 1  # unknown words still fall back to characters


def test_contrastive_loss_is_clips():
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    scale = torch.tensor(2.0)
    loss, accuracy = clip_contrastive_loss(image, text, scale)
    logits_per_text = scale.exp() * torch.nn.functional.normalize(text, dim=1) @ torch.nn.functional.normalize(
        image, dim=1).t()
    clips_loss = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
    torch.testing.assert_close(loss, clips_loss(logits_per_text))
    loss_matched, accuracy_matched = clip_contrastive_loss(image, image, torch.tensor(4.0))
    assert accuracy_matched == 1.0 and loss_matched < loss


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The small recipe pre-trained into a temporary cache (the population generated there too)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CCAFL_HF_CACHE", str(cache))
        torch.manual_seed(123)
        untrained_model, _, _ = pretrain_tiny_clip(TinyCLIPPretrainingConfig(**{**SMALL_RECIPE.__dict__, "steps": 0}),
                                                   show_progress=False)
        model, processor = load_tiny_pretrained(SMALL_RECIPE)
    return cache, untrained_model, model, processor


def _caption_retrieval_accuracy(model, processor, cache, monkeypatch) -> float:
    """Fraction of the population's images whose best caption (among all people's) is their own."""
    from ccafl_hf.data import load_reid_dataset
    from ccafl_hf.data.images import load_image

    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))
    train = load_reid_dataset("synthetic", None, **SMALL_RECIPE.population_options())["train"]
    people = sorted(set(train["diagnostic_pid"]))
    tokens = processor.tokenizer([identity_caption(SMALL_RECIPE.population_seed, p) for p in people],
                                 padding=True, return_tensors="pt")
    images = processor.image_processor([load_image(path) for path in train["image_path"]], return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**tokens).pooler_output
        image = model.get_reid_outputs(images["pixel_values"]).alignment_features
    best = (torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(text, dim=1).t()).argmax(1)
    truth = torch.tensor([people.index(p) for p in train["diagnostic_pid"]])
    return (best == truth).float().mean().item()


def test_pretraining_aligns_images_with_their_captions(pretrained, monkeypatch):
    cache, untrained_model, model, processor = pretrained
    before = _caption_retrieval_accuracy(untrained_model.eval(), processor, cache, monkeypatch)
    after = _caption_retrieval_accuracy(model, processor, cache, monkeypatch)
    assert after > max(3 * before, 3 / 24)  # well above chance (1/24) and the untrained model
    assert model.neck.weight.eq(1).all()  # pre-training leaves the ReID neck alone


def test_pretrained_model_is_cached_and_reused(pretrained, monkeypatch):
    cache, _, model, _ = pretrained
    monkeypatch.setenv("CCAFL_HF_CACHE", str(cache))
    root = default_pretrained_root(SMALL_RECIPE)
    summary = json.loads((root / PRETRAINING_FILE).read_text())
    assert summary["recipe"]["steps"] == SMALL_RECIPE.steps and summary["num_people"] == 24

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained again instead of loading the cache")

    monkeypatch.setattr("ccafl_hf.tiny.pretraining.pretrain_tiny_clip", fail)
    again, processor = load_tiny_pretrained(SMALL_RECIPE)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert processor.tokenizer.tokenize("backpack") == ["backpack</w>"]
    assert default_pretrained_root(SMALL_RECIPE) != default_pretrained_root(TinyCLIPPretrainingConfig())


def test_build_model_tiny_pretrained_loads_the_shipped_weights(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pre-trained instead of loading the shipped weights")

    monkeypatch.setattr("ccafl_hf.tiny.pretraining.pretrain_tiny_clip", fail)
    built, processor = build_model(ModelArguments(model_name_or_path="tiny-pretrained"), seed=5)
    assert isinstance(built, CCAFLModel)
    shipped = load_file(str(SHIPPED_WEIGHTS))
    assert shipped.keys() == built.state_dict().keys()
    for name, tensor in built.state_dict().items():
        torch.testing.assert_close(tensor, shipped[name], rtol=0, atol=0, msg=name)
    assert processor.tokenizer.tokenize("backpack") == ["backpack</w>"]
    assert not default_pretrained_root(TinyCLIPPretrainingConfig()).exists()  # nothing built or cached
    from ccafl_hf.pipeline import RunError

    with pytest.raises(RunError, match="runs at"):
        build_model(ModelArguments(model_name_or_path="tiny-pretrained", image_size=[128, 64]))
    with pytest.raises(RunError, match="config_overrides"):
        build_model(ModelArguments(model_name_or_path="tiny-pretrained", config_overrides='{"projection_dim": 8}'))


def test_shipped_weights_are_the_default_recipes():
    """The packaged file is small, names the default recipe by its fingerprint, and fits its architecture."""
    assert SHIPPED_WEIGHTS.stat().st_size < 1024 * 1024
    metadata = read_weights_metadata()
    recipe = TinyCLIPPretrainingConfig()
    assert metadata["fingerprint"] == recipe.fingerprint()
    assert TinyCLIPPretrainingConfig(**metadata["summary"]["recipe"]) == recipe
    assert metadata["summary"]["final_batch_accuracy"] > 0.5  # the recipe learnt (chance: 1 / batch_size)
    architecture, _ = tiny_pretrained_architecture(recipe)
    shipped = load_file(str(SHIPPED_WEIGHTS))
    expected = architecture.state_dict()
    assert {k: tuple(v.shape) for k, v in shipped.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert shipped["neck.weight"].eq(1).all()  # pre-training leaves the ReID neck alone


@pytest.mark.slow
def test_rebuilding_reproduces_the_shipped_weights(tmp_path, monkeypatch):
    """The recipe rebuilds the shipped file (about ten minutes on one CPU thread). Bit for bit on the torch
    build and CPU capability that made it; elsewhere (float sums in another order) to a tolerance: an AVX2
    build and one with ``ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2`` differ by at most 0.013
    (another recipe, e.g. another seed, differs by far more)."""
    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    rebuilt = load_file(str(rebuild_shipped_weights(tmp_path / "rebuilt.safetensors", show_progress=False)))
    shipped, metadata = load_file(str(SHIPPED_WEIGHTS)), read_weights_metadata()
    same_machine = (metadata["torch"], metadata["cpu_capability"]) == (
        torch.__version__, torch.backends.cpu.get_cpu_capability())
    assert rebuilt.keys() == shipped.keys()
    for name in shipped:
        if same_machine:
            assert torch.equal(rebuilt[name], shipped[name]), name
        else:
            torch.testing.assert_close(rebuilt[name], shipped[name], rtol=0.05, atol=0.02, msg=name)


def test_bad_recipe_is_refused_by_name():
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        TinyCLIPPretrainingConfig(batch_size=1)
    with pytest.raises(ValueError, match="learning_rate"):
        TinyCLIPPretrainingConfig(learning_rate=0.0)


def test_root_with_other_files_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):
        load_tiny_pretrained(SMALL_RECIPE, root=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"

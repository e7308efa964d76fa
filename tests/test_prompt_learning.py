"""Stage 1: PEFT identity prompts trained on cached features with the per-camera contrastive losses."""

import pytest
import torch
from peft import PeftConfig, PromptTuningConfig

from ccafl_hf import create_tiny_model
from ccafl_hf.prompts import IdentityPromptLearner
from ccafl_hf.trainers import CCAFLTrainingArguments, FeatureCache, PromptLearningTrainer


def _frozen_setup(num_identities=12, seed=0):
    model, processor = create_tiny_model(seed=seed)
    model.eval().requires_grad_(False)
    learner = IdentityPromptLearner(model, processor.tokenizer, num_identities)
    return model, processor, learner


def _clustered_cache(num_identities=12, num_cameras=3, per_id=6, dim=32, seed=0):
    """Image features clustered by identity, identities spread over cameras (intra ids laid end to end)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_identities, dim, generator=g) * 3
    intra = torch.arange(num_identities).repeat_interleave(per_id)
    feats = centers[intra] + 0.3 * torch.randn(intra.numel(), dim, generator=g)
    identity_camids = torch.arange(num_identities) * num_cameras // num_identities
    return FeatureCache(feats, intra, identity_camids[intra]), identity_camids


def _args(tmp_path, **kw):
    base = dict(prompt_epochs=15, prompt_batch_size=24, prompt_learning_rate=0.01, prompt_warmup_epochs=1,
                seed=0, logging_strategy="no", save_strategy="no", disable_tqdm=True)
    base.update(kw)
    return CCAFLTrainingArguments(output_dir=str(tmp_path), **base).stage_arguments("prompt")


def test_prompt_learning_trains_only_prompts_and_aligns_identities(tmp_path):
    model, _, learner = _frozen_setup()
    cache, identity_camids = _clustered_cache()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        loss_before = _loss(learner, cache)
    trainer = PromptLearningTrainer(learner, _args(tmp_path), cache)
    trainer.train()
    with torch.no_grad():
        loss_after = _loss(learner, cache)
    # frozen CLIP weights are bit-identical
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert loss_after < 0.7 * loss_before
    # within each camera, image→text retrieval finds the right identity far above chance
    text = learner.all_text_features()
    logits = cache.features @ text.T
    same_cam = identity_camids[None, :] == cache.camids[:, None]
    logits = logits.masked_fill(~same_cam, float("-inf"))
    accuracy = (logits.argmax(1) == cache.intra_ids).float().mean().item()
    chance = 1.0 / (identity_camids.bincount().float().mean().item())
    assert accuracy > chance + 0.4, (accuracy, chance)


def _loss(learner, cache):
    from ccafl_hf.losses import prompt_contrastive_loss

    return prompt_contrastive_loss(cache.features, learner(cache.intra_ids), cache.intra_ids, cache.camids).item()


def test_trainer_refuses_unfrozen_clip(tmp_path):
    model, processor = create_tiny_model()
    learner = IdentityPromptLearner(model, processor.tokenizer, 4)
    cache, _ = _clustered_cache(num_identities=4)
    with pytest.raises(ValueError, match="freeze"):
        PromptLearningTrainer(learner, _args(tmp_path), cache)


def test_peft_adapter_round_trip(tmp_path):
    model, processor, learner = _frozen_setup(num_identities=7)
    with torch.no_grad():
        learner.prompt_embedding.embedding.weight.add_(torch.randn_like(learner.prompt_embedding.embedding.weight))
    learner.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, PromptTuningConfig)
    assert config.num_virtual_tokens == 7 * model.config.num_prompt_tokens
    loaded = IdentityPromptLearner.from_pretrained(tmp_path / "adapter", model, processor.tokenizer)
    torch.testing.assert_close(loaded.all_text_features(), learner.all_text_features(), rtol=0, atol=0)


def test_prompt_splices_vectors_at_placeholders_only():
    model, processor, learner = _frozen_setup(num_identities=3)
    embeds = learner.prompt_embeddings(torch.tensor([0, 2]))
    base = model.text_model.embeddings.token_embedding(learner.token_ids)
    mask = torch.zeros(learner.token_ids.numel(), dtype=torch.bool)
    mask[learner.placeholder_positions] = True
    torch.testing.assert_close(embeds[:, ~mask], base[~mask].expand(2, -1, -1))
    torch.testing.assert_close(embeds[1, mask], learner.prompt_vectors[2])
    # identities differ only through their vectors
    features = learner(torch.tensor([0, 1, 2]))
    assert not torch.allclose(features[0], features[1])


def test_bf16_autocast_prompt_steps_are_finite():
    _, _, learner = _frozen_setup(num_identities=6)
    cache, _ = _clustered_cache(num_identities=6)
    from ccafl_hf.losses import prompt_contrastive_loss

    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text = learner(cache.intra_ids)
            loss = prompt_contrastive_loss(cache.features, text, cache.intra_ids, cache.camids)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(learner.prompt_embedding.embedding.weight).all()

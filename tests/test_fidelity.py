"""The last details of fidelity to the authors' code (docs/method.md §8): each rule of the package against a
slow port of the reference rule written from its description — the global-ID classifier's initialisation
and its step before the adversarial forward, the camera memory's instance slots, the image-count weighting
of the ICAL cluster features, and the stage-1 schedule."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import reference_rules
from ccafl_hf import create_tiny_model
from ccafl_hf.classifier import IdentityClassifier
from ccafl_hf.data import ReIDCollator, build_eval_transform, build_train_transform
from ccafl_hf.memory import cluster_features
from ccafl_hf.trainers import CCAFLForTraining, CCAFLTrainer, CCAFLTrainingArguments


def _collators(model, processor):
    height, width = model.config.image_size
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    return (ReIDCollator(build_train_transform(height, width, mean, std)),
            ReIDCollator(build_eval_transform(height, width, mean, std)))


# ------------------------------------------------------------------------------------------------
# 2. global-ID classifier: xavier-uniform, and its Adam step before the adversarial forward
# ------------------------------------------------------------------------------------------------


def test_classifier_init_is_xavier_uniform():
    torch.manual_seed(0)
    n, d = 3262, 2048  # Market-1501 identities x RN50 retrieval width
    weight = IdentityClassifier(n, d).weight.detach()
    bound = math.sqrt(6 / (n + d))  # 0.034
    assert bound == pytest.approx(0.0336, abs=1e-4)
    assert weight.abs().max() <= bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)  # U(-a, a)
    assert weight.norm(dim=1).mean().item() == pytest.approx(bound * math.sqrt(d / 3), rel=0.01)


def _adam_first_step(weight, grad, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """Adam's first step (L2 decay added to the gradient), from its definition."""
    g = grad + weight_decay * weight
    m_hat = (1 - betas[0]) * g / (1 - betas[0])
    v_hat = (1 - betas[1]) * g * g / (1 - betas[1])
    return weight - lr * m_hat / (v_hat.sqrt() + eps)


def test_classifier_steps_before_the_adversarial_loss(small_synthetic, tmp_path):
    """One training step of the ICAL loop in an adversarial epoch (only the adversarial loss on) equals the
    reference's order: x = encoder(images); the classifier's Adam steps on CE(16 cos(x.detach(), W));
    the adversarial loss reads the **updated** W; its gradient reaches the encoder only."""
    dataset, info = small_synthetic
    model, processor = create_tiny_model(seed=0)
    train_collator, eval_collator = _collators(model, processor)
    args = CCAFLTrainingArguments(
        output_dir=str(tmp_path), num_identities_per_batch=4, num_instances=2, iters_per_epoch=2, icdl_epochs=1,
        ical_epochs=1, adversarial_start_epoch=1, adversarial_end_epoch=1, classifier_learning_rate=0.05,
        use_memory_loss=False, use_image_text_loss=False, use_triplet_loss=False, adversarial_margin=0.5,
        disable_tqdm=True, logging_strategy="no", save_strategy="no", report_to="none", seed=0,
    )
    camids = torch.as_tensor(info.identity_camids)
    module = CCAFLForTraining(model, camids, None, memory_instances=args.memory_instances,
                              classifier_scale=args.classifier_scale)
    n = camids.numel()
    pseudo = torch.arange(n) // 3  # toy association: groups of three consecutive identities
    module.pseudo_labels.copy_(pseudo)
    trainer = CCAFLTrainer(module, args, dataset["train"], train_collator, eval_collator, stages=("ical",))
    # the adversarial epoch, keeping the toy pseudo-labels (no `prepare_epoch`, which would re-associate)
    trainer.loop_epoch, trainer.objective = trainer.epoch_range[0], trainer.objectives["ical"]
    assert trainer.objective.adversarial_active(trainer.loop_epoch)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop, which this test steps past
    batch = eval_collator([dataset["train"][i] for i in range(0, 16, 2)])

    reference_model = copy.deepcopy(model).train()
    w0 = module.classifier.weight.detach().clone()
    trainer.training_step(trainer.model, batch)

    # the reference, from its description
    x = reference_model.get_reid_features(batch["pixel_values"])
    ids = batch["intra_ids"]
    w = w0.clone().requires_grad_(True)
    F.cross_entropy(16 * F.normalize(x.detach(), dim=1) @ F.normalize(w, dim=1).t(), ids).backward()
    w1 = _adam_first_step(w0, w.grad, lr=0.05, weight_decay=args.classifier_weight_decay)
    torch.testing.assert_close(module.classifier.weight.detach(), w1, rtol=1e-5, atol=1e-6)

    def encoder_grads(weight):
        reference_model.zero_grad()
        cosines = (F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()).double()
        reference_rules.adversarial_loss(cosines, ids, camids, pseudo, m=0.5).backward(retain_graph=True)
        return {k: p.grad.clone() for k, p in reference_model.named_parameters() if p.grad is not None}

    expected, stale = encoder_grads(w1), encoder_grads(w0)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    scale = max(g.abs().max().item() for g in expected.values())  # fp32 against float64: to 1e-5 of the largest
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5 * scale)
    # the order matters here: the gradients with the classifier before its step are measurably different
    assert max((expected[k] - stale[k]).abs().max() / expected[k].abs().max() for k in expected) > 1e-2
    # the gradient the adversarial loss could leave on W is discarded: W's gradient is the classification loss's
    torch.testing.assert_close(module.classifier.weight.grad, w.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 3. camera-memory instance slots: see tests/test_memory.py (test_camera_memory_update_matches_loop)
# 4. ICAL cluster centroids and text features averaged over the cluster's images
# ------------------------------------------------------------------------------------------------


def _reference_cluster_features(pseudo, image_features, image_ids, text_features):
    """§5 with the reference's averages, cluster by cluster, image by image."""
    centroids, texts = [], []
    for g in range(int(pseudo.max()) + 1):
        images = [k for k in range(len(image_ids)) if pseudo[image_ids[k]] == g]
        centroids.append(F.normalize(sum(image_features[k] for k in images), dim=0))
        texts.append(sum(text_features[image_ids[k]] for k in images) / len(images))
    return torch.stack(centroids), torch.stack(texts)


def test_cluster_features_weight_identities_by_image_count(tiny_model):
    model, _ = tiny_model
    g = torch.Generator().manual_seed(3)
    n, d = 9, model.reid_feature_dim
    camids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pseudo = torch.tensor([0, -1, 1, 0, 1, 2, 2, -1, 0])
    image_ids = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 8, 2, 2, 2, 2, 2])  # 1 to 7 images
    image_features = F.normalize(torch.randn(len(image_ids), d, generator=g), dim=1)
    text_features = torch.randn(n, model.projection_dim, generator=g)
    ref_centroids, ref_texts = _reference_cluster_features(pseudo, image_features, image_ids, text_features)

    centroids, texts = cluster_features(pseudo, image_features, image_ids, text_features)
    torch.testing.assert_close(centroids, ref_centroids)
    torch.testing.assert_close(texts, ref_texts)
    # not the equal-weight average of unit identity means: identity 2 (6 images) outweighs 4 (3) in cluster 1
    equal = F.normalize(F.normalize(image_features[image_ids == 2].mean(0), dim=0)
                        + F.normalize(image_features[image_ids == 4].mean(0), dim=0), dim=0)
    assert not torch.allclose(centroids[1], equal, atol=1e-3)

    args = CCAFLTrainingArguments(output_dir="unused", report_to="none")
    module = CCAFLForTraining(model, camids, text_features, memory_instances=args.memory_instances)
    module.set_pseudo_labels(pseudo, image_features, image_ids)
    torch.testing.assert_close(module.cluster_memory.centroids, ref_centroids)
    torch.testing.assert_close(module.cluster_text_features, ref_texts)
    assert torch.equal(module.pseudo_labels, pseudo)


# ------------------------------------------------------------------------------------------------
# 6. stage-1 schedule: the reference's per-epoch warm-up from 1e-5 and cosine to 1e-6
# ------------------------------------------------------------------------------------------------


def _reference_prompt_lr(e, lr0=3.5e-4, epochs=60, warmup=5, warmup_lr=1e-5, min_lr=1e-6):
    """timm's CosineLRScheduler(t_initial=epochs, warmup_t=warmup, warmup_lr_init, lr_min) at epoch e."""
    if e < warmup:
        return warmup_lr + e * (lr0 - warmup_lr) / warmup
    return min_lr + 0.5 * (lr0 - min_lr) * (1 + math.cos(math.pi * e / epochs))


def test_prompt_epoch_lr_is_the_reference_schedule():
    from ccafl_hf.trainers.schedules import prompt_epoch_lr

    got = [prompt_epoch_lr(e, 3.5e-4, 60) for e in range(1, 61)]
    assert got == pytest.approx([_reference_prompt_lr(e) for e in range(1, 61)], rel=1e-12)
    assert got[:5] == pytest.approx([7.8e-5, 1.46e-4, 2.14e-4, 2.82e-4, 3.44e-4], rel=2e-3)  # Market-1501
    assert got[-1] == pytest.approx(1e-6) and min(got) > 0


@pytest.mark.parametrize("schedule", ["epoch_cosine", "cosine"])
def test_prompt_trainer_follows_the_chosen_schedule(schedule, tmp_path):
    from transformers import TrainerCallback

    from ccafl_hf.prompts import IdentityPromptLearner
    from ccafl_hf.trainers import FeatureCache, PromptLearningTrainer

    model, processor = create_tiny_model(seed=0)
    model.eval().requires_grad_(False)
    learner = IdentityPromptLearner(model, processor.tokenizer, 6)
    intra = torch.arange(6).repeat_interleave(5)  # 30 features, batch 8: 4 steps per epoch
    cache = FeatureCache(torch.randn(30, model.projection_dim), intra, intra // 2)
    args = CCAFLTrainingArguments(
        output_dir=str(tmp_path), prompt_epochs=6, prompt_batch_size=8, prompt_learning_rate=0.01,
        prompt_warmup_epochs=2, prompt_lr_schedule=schedule, prompt_warmup_lr=1e-3, prompt_min_lr=1e-4,
        logging_strategy="no", save_strategy="no", disable_tqdm=True, report_to="none", seed=0,
    ).stage_arguments("prompt")
    seen = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])

    PromptLearningTrainer(learner, args, cache, callbacks=[Record()]).train()
    assert len(seen) == 24
    expected = [_reference_prompt_lr(e, 0.01, 6, 2, 1e-3, 1e-4) for e in range(1, 7) for _ in range(4)]
    if schedule == "epoch_cosine":
        assert seen == pytest.approx(expected, rel=1e-9)
    else:  # the Trainer's per-step cosine: from 0, changes every step, far from the reference
        assert seen[0] == 0.0 and len(set(seen)) > 12
        assert seen != pytest.approx(expected, rel=0.05)


# ------------------------------------------------------------------------------------------------
# 7. --eval_every_epochs: periodic evaluations logged, the best recorded as best_on_test, the final reported
# ------------------------------------------------------------------------------------------------


def _icdl_loop(small_synthetic, tmp_path, **overrides):
    dataset, info = small_synthetic
    model, processor = create_tiny_model(seed=0)
    train_collator, eval_collator = _collators(model, processor)
    args = CCAFLTrainingArguments(
        output_dir=str(tmp_path), num_identities_per_batch=8, num_instances=4, iters_per_epoch=2, icdl_epochs=2,
        memory_instances=4, warmup_epochs=1, learning_rate=1e-3, per_device_eval_batch_size=128, disable_tqdm=True,
        logging_strategy="no", save_strategy="no", report_to="none", seed=0, **overrides,
    )
    module = CCAFLForTraining(model, torch.as_tensor(info.identity_camids), None, memory_instances=args.memory_instances)
    trainer = CCAFLTrainer(module, args, dataset["train"], train_collator, eval_collator, stages=("icdl",),
                           eval_dataset={"query": dataset["query"], "gallery": dataset["gallery"]})
    trainer.train()
    return trainer


def test_eval_every_epochs_logs_the_best_and_keeps_the_final(small_synthetic, tmp_path):
    """Two ICDL epochs evaluated after each (the ICDL loop is bit-reproducible on the CPU, so the final
    results can be compared exactly with a run evaluated at the stage end only)."""
    from ccafl_hf import CCAFLModel
    from ccafl_hf.evaluation import evaluate_reid_model
    from ccafl_hf.trainers.base import read_best_on_test

    plain = _icdl_loop(small_synthetic, tmp_path / "plain")
    periodic = _icdl_loop(small_synthetic, tmp_path / "periodic", eval_every_epochs=1, save_best_checkpoint=True)
    # the final (stage-end) results are those of the run without periodic evaluations, bit for bit
    assert periodic.stage_results == plain.stage_results
    assert read_best_on_test(tmp_path / "plain") is None  # nothing recorded without the options
    logged = [e for e in periodic.state.log_history if "eval_mAP" in e]
    assert [e["eval_loop_epoch"] for e in logged] == [1, 2]  # every epoch, the stage end included
    assert len([e for e in plain.state.log_history if "eval_mAP" in e]) == 1
    best = read_best_on_test(tmp_path / "periodic")
    top = max(logged, key=lambda e: e["eval_mAP"])
    assert best["epoch"] == top["eval_loop_epoch"] and best["mAP"] == top["eval_mAP"]
    assert best["rank1"] == top["eval_rank1"] and "test set" in best["selected_on"]
    assert best["num_evaluations"] == 2 and best["checkpoint"] == "best_on_test"
    # the kept model is the one evaluated best: evaluating it again gives the recorded mAP
    dataset, _ = small_synthetic
    kept = CCAFLModel.from_pretrained(tmp_path / "periodic" / "best_on_test")
    metrics = evaluate_reid_model(kept, dataset["query"], dataset["gallery"], periodic.eval_collator,
                                  batch_size=128, progress=False)
    assert float(metrics["mAP"]) == pytest.approx(best["mAP"], abs=1e-4)


def test_eval_results_record_best_on_test_next_to_the_final(tmp_path, monkeypatch):
    """A tiny run with --eval_every_epochs 1: eval_results.json reports the final model at the top level and the
    best logged evaluation under best_on_test; --image_normalization imagenet is stored with the processor."""
    import json

    from ccafl_hf.commands import train_main
    from ccafl_hf.data.transforms import IMAGENET_MEAN
    from synthetic_options import SMALL_SYNTHETIC

    monkeypatch.setenv("CCAFL_HF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = train_main(["--output_dir", str(out), "--model_name_or_path", "tiny", "--dataset_options",
                       json.dumps(SMALL_SYNTHETIC), "--prompt_epochs", "1", "--icdl_epochs", "1", "--ical_epochs", "2",
                       "--iters_per_epoch", "2", "--eval_every_epochs", "1", "--save_best_checkpoint", "true",
                       "--image_normalization", "imagenet", "--random_erasing_style", "reference",
                       "--prompt_lr_schedule", "epoch_cosine", "--disable_tqdm", "true", "--report_to", "none"])
    assert code == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert {k: results[k] for k in results["stages"]["ical"]} == results["stages"]["ical"]  # the final model
    best = results["best_on_test"]
    state = json.loads(sorted((out / "checkpoints" / "icdl_ical").glob("checkpoint-*"),
                              key=lambda p: int(p.name.split("-")[1]))[-1].joinpath("trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "eval_mAP" in e]
    assert [e["eval_loop_epoch"] for e in logged] == [1, 2, 3]
    assert best["mAP"] == max(e["eval_mAP"] for e in logged) and "test set" in best["selected_on"]
    assert (out / best["checkpoint"] / "model.safetensors").is_file()
    assert best["checkpoint"] == "checkpoints/icdl_ical/best_on_test"
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)  # the trained model's processor normalises as it was trained
    assert processor.image_processor.image_mean == pytest.approx(list(IMAGENET_MEAN))


# ------------------------------------------------------------------------------------------------
# 8. smaller items: the text activation of an open_clip folder, the reference's erasing and normalisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, folder_name, expected", [
    (None, "rn50-local", ValueError), (False, "rn50-local", "gelu"), (True, "rn50-local", "quick_gelu"),
    (None, "resnet50_clip.openai", "quick_gelu"),
])
def test_text_activation_is_read_from_the_config_or_refused(tmp_path, flag, folder_name, expected):
    import json

    from safetensors.torch import save_file

    from ccafl_hf.convert_open_clip import find_open_clip_checkpoint, open_clip_config_kwargs

    open_clip = pytest.importorskip("open_clip")
    model_cfg = dict(open_clip.get_model_config("RN50"))
    model_cfg.pop("quick_gelu", None)
    if flag is not None:
        model_cfg["quick_gelu"] = flag
    folder = tmp_path / "models" / folder_name
    folder.mkdir(parents=True)
    save_file({"logit_scale": torch.zeros(())}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    checkpoint = find_open_clip_checkpoint(folder)
    if expected is ValueError:
        with pytest.raises(ValueError, match="does not say whether the text tower uses QuickGELU") as info:
            open_clip_config_kwargs(checkpoint)
        assert "\n" not in str(info.value) and '"quick_gelu": true' in str(info.value)
    else:
        assert open_clip_config_kwargs(checkpoint)["text_config"]["hidden_act"] == expected


def test_reference_random_erasing_fill_and_aspect():
    """The reference's erasing: the box holds ImageNet's mean values (normalised units) and its aspect ratio is
    uniform on [0.3, 1/0.3] (mean 1.82), not log-uniform as torchvision's (mean 1.26)."""
    from ccafl_hf.data.transforms import IMAGENET_MEAN, ReferenceRandomErasing

    torch.manual_seed(0)
    erase = ReferenceRandomErasing(p=1.0)
    aspects = []
    for _ in range(400):
        image = erase(torch.full((3, 256, 128), 5.0))
        box = image[0] != 5.0
        rows, cols = box.any(1).nonzero().squeeze(1), box.any(0).nonzero().squeeze(1)
        h, w = len(rows), len(cols)
        assert int(box.sum()) == h * w  # one rectangle
        for channel, value in enumerate(IMAGENET_MEAN):
            assert torch.all(image[channel][box] == torch.tensor(value))
        aspects.append(h / w)
    mean = sum(aspects) / len(aspects)
    assert 1.6 < mean < 2.0, mean  # uniform on [0.3, 3.33]: 1.82 (boxes that do not fit skew it slightly)
    assert erase.p == 1.0 and ReferenceRandomErasing(p=0.0)(torch.ones(3, 8, 4)).eq(1).all()


def test_image_normalization_choices():
    from ccafl_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD, image_normalization
    from ccafl_hf.processing import CLIP_MEAN, CLIP_STD

    assert image_normalization("processor", CLIP_MEAN, CLIP_STD) == (list(CLIP_MEAN), list(CLIP_STD))
    assert image_normalization("imagenet", CLIP_MEAN, CLIP_STD) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    with pytest.raises(ValueError, match="--image_normalization must be one of processor, imagenet"):
        CCAFLTrainingArguments(output_dir="unused", image_normalization="clip")

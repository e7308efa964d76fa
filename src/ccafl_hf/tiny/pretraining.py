"""A tiny CLIP with a vision–language prior: contrastive pre-training on captioned synthetic people.

CCAFL transfers CLIP's knowledge: stage 1 learns, through the frozen text tower, one prompt per
identity that matches that identity's images, and the image–text losses of stages 2–3 pull the
image features towards those text features. With a *randomly initialised* tiny CLIP there is
nothing to transfer (the prompts can only memorise the untrained, camera-dominated image
features), so the demo and the ablation start from ``"tiny-pretrained"``: the same tiny
architecture pre-trained the way CLIP is — symmetric image–text contrastive loss on (image, caption)
pairs — on a synthetic population that is *disjoint* from the ReID data (other people, other
cameras). Captions are attribute descriptions of each person's true look
(`ccafl_hf.data.synthetic.describe_look`); no ReID label of the training data is ever used.

The weights of the default recipe ship with the package (``tiny/tiny-pretrained.safetensors``,
well under 1 MB, made by this module's own recipe), so loading them takes no time::

    from ccafl_hf.tiny.pretraining import load_tiny_pretrained
    model, processor = load_tiny_pretrained()

Rebuild the shipped file from the recipe with ``python -m ccafl_hf.tiny.pretraining`` (about ten
minutes on one CPU thread; on the same torch build and CPU the result is bit-identical). Any other
recipe is pre-trained on first use and cached in ``$CCAFL_HF_CACHE/models/tiny-pretrained-<fingerprint>``
(default cache ``~/.cache/ccafl_hf``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import CLIPProcessor, get_cosine_schedule_with_warmup

from ..data import ReIDCollator, build_eval_transform, load_reid_dataset
from ..data.synthetic import CAPTION_WORDS, identity_caption
from ..modeling_ccafl import CCAFLModel
from ..utils.cache import cache_dir, fingerprint, write_folder_atomically
from .config import create_tiny_model
from .tokenizer import TINY_VOCAB_WORDS, build_tiny_tokenizer

logger = logging.getLogger(__name__)

#: ``--model_name_or_path`` value that selects the cached pre-trained tiny CLIP.
TINY_PRETRAINED_NAME = "tiny-pretrained"
PRETRAINING_FILE = "pretraining.json"
PRETRAINING_VERSION = 2  # bump when the recipe changes, so cached models are rebuilt
#: The default recipe's weights, shipped with the package (rebuild: ``python -m ccafl_hf.tiny.pretraining``).
SHIPPED_WEIGHTS = Path(__file__).parent / f"{TINY_PRETRAINED_NAME}.safetensors"
_LOG_EVERY = 50  # steps between progress-bar updates of the loss and accuracy


@dataclass(frozen=True)
class TinyCLIPPretrainingConfig:
    """Recipe of the pre-trained tiny CLIP (every field enters the cache fingerprint).

    Attributes:
        population_seed: seed of the synthetic population (the ReID demo data uses seed 0: other people
            and other camera styles).
        num_identities / num_cameras / images_per_identity_per_camera: size of that population.
        patch_size: vision patch size of the tiny tower (4: 16×8 patches at 64×32, as the demo).
        max_text_length: text positions (captions are at most ~35 tokens).
        steps / batch_size: optimisation steps; each batch holds distinct people (no false negatives).
        learning_rate / weight_decay / warmup_steps: AdamW with cosine decay after linear warm-up.
        seed: model initialisation, batch sampling and augmentation.
        num_threads: CPU threads of the build. Float sums depend on how they are split between threads,
            so the thread count is part of the recipe: with it fixed, a rebuild on the same torch build
            and CPU reproduces the weights bit for bit.
    """

    population_seed: int = 1
    num_identities: int = 1000
    num_cameras: int = 8
    images_per_identity_per_camera: int = 2
    patch_size: int = 4
    max_text_length: int = 48
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    num_threads: int = 1

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= {low}, got {getattr(self, name)}" for name, low in (
            ("num_identities", 2), ("num_cameras", 2), ("images_per_identity_per_camera", 2), ("patch_size", 1),
            ("max_text_length", 8), ("steps", 0), ("batch_size", 2), ("warmup_steps", 0), ("num_threads", 1)) if getattr(self, name) < low]
        if not self.learning_rate > 0 or self.weight_decay < 0:
            problems.append(f"learning_rate must be > 0 and weight_decay >= 0, got {self.learning_rate}, "
                            f"{self.weight_decay}")
        if problems:
            raise ValueError("TinyCLIPPretrainingConfig: " + "; ".join(problems))

    def fingerprint(self) -> str:
        """Short hash naming the cache folder of this recipe."""
        return fingerprint({**asdict(self), "version": PRETRAINING_VERSION})

    def population_options(self) -> dict:
        """`load_reid_dataset("synthetic", ...)` options of the pre-training population."""
        return {
            "num_train_identities": self.num_identities,
            "num_test_identities": 1,
            "num_cameras": self.num_cameras,
            "images_per_identity_per_camera": self.images_per_identity_per_camera,
            "num_distractors": 0,
            "seed": self.population_seed,
        }


def default_pretrained_root(config: TinyCLIPPretrainingConfig) -> Path:
    """``$CCAFL_HF_CACHE/models/tiny-pretrained-<fingerprint>``."""
    return cache_dir("models", f"{TINY_PRETRAINED_NAME}-{config.fingerprint()}")


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random flip, scale (0.9–1.1) and shift (±8 %) of ``pixels [B, 3, H, W]`` in one
    ``grid_sample`` call (vectorised; the border is replicated)."""
    batch = pixels.shape[0]
    scale = torch.empty(batch).uniform_(0.9, 1.1, generator=generator)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    shift = torch.empty(batch, 2).uniform_(-0.08, 0.08, generator=generator)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = flip / scale
    theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE over a batch of matching pairs.

    Args:
        image_features / text_features: ``[B, P]`` projected features (row i of each is a pair).
        logit_scale: log of the inverse temperature (CLIP's learnable scalar).
    Returns:
        ``(loss, accuracy)``: the mean of the image→text and text→image cross-entropies, and the
        fraction of images whose best caption is their own.
    """
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * image_features @ text_features.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    accuracy = (logits.argmax(dim=1) == targets).float().mean()
    return loss, accuracy


def pretrain_tiny_clip(config: TinyCLIPPretrainingConfig | None = None,
                       show_progress: bool = True) -> tuple[CCAFLModel, CLIPProcessor, dict]:
    """Pre-train a tiny CLIP contrastively on captioned synthetic people (see the module docstring).

    Returns:
        ``(model, processor, summary)``; the processor's tokenizer keeps the prompt template's and
        the captions' words whole. ``summary`` holds the recipe and the final loss / accuracy.
    """
    config = config or TinyCLIPPretrainingConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _pretrain(config, show_progress)
    finally:
        torch.set_num_threads(threads)


def tiny_pretrained_architecture(config: TinyCLIPPretrainingConfig) -> tuple[CCAFLModel, CLIPProcessor]:
    """The recipe's tiny model at initialisation (seed ``config.seed``) and its processor, whose
    tokenizer keeps the prompt template's and the captions' words whole."""
    tokenizer = build_tiny_tokenizer((*TINY_VOCAB_WORDS, *CAPTION_WORDS))
    return create_tiny_model(
        seed=config.seed, tokenizer=tokenizer, vision_config={"patch_size": config.patch_size},
        text_config={"max_position_embeddings": config.max_text_length},
    )


def _pretrain(config: TinyCLIPPretrainingConfig, show_progress: bool) -> tuple[CCAFLModel, CLIPProcessor, dict]:
    population = load_reid_dataset("synthetic", None, **config.population_options())["train"]
    identities = torch.tensor(population["diagnostic_pid"])
    people, image_person = torch.unique(identities, return_inverse=True)  # person index of every image

    model, processor = tiny_pretrained_architecture(config)
    tokenizer = processor.tokenizer
    captions = [identity_caption(config.population_seed, int(pid)) for pid in people]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    if tokens["input_ids"].shape[1] > config.max_text_length:
        raise ValueError(f"captions need {tokens['input_ids'].shape[1]} text positions, max_text_length is "
                         f"{config.max_text_length}")

    # every image decoded once at the model's size; augmentation is then one batched grid_sample
    height, width = model.config.image_size
    image_processor = processor.image_processor
    loader = DataLoader(population, batch_size=256, collate_fn=ReIDCollator(
        build_eval_transform(height, width, image_processor.image_mean, image_processor.image_std)))
    pixels = torch.cat([batch["pixel_values"] for batch in loader])
    by_person = torch.argsort(image_person, stable=True)  # image indices grouped by person
    counts = torch.bincount(image_person, minlength=len(people))
    offsets = torch.cumsum(counts, 0) - counts

    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad and p is not model.neck.weight],
        lr=config.learning_rate, weight_decay=config.weight_decay,
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    batch_size = min(config.batch_size, len(people))
    final = {"final_loss": None, "final_batch_accuracy": None}
    model.train()
    progress = tqdm(range(config.steps), desc="pre-training the tiny CLIP", disable=not show_progress)
    for step in progress:
        chosen = torch.randperm(len(people), generator=generator)[:batch_size]  # distinct people
        pick = offsets[chosen] + (torch.rand(batch_size, generator=generator) * counts[chosen]).long()
        images = _augment(pixels[by_person[pick]], generator)
        image_features = model.get_reid_outputs(images).alignment_features
        text_features = model.get_text_features(
            input_ids=tokens["input_ids"][chosen], attention_mask=tokens["attention_mask"][chosen]
        ).pooler_output
        loss, accuracy = clip_contrastive_loss(image_features, text_features, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % _LOG_EVERY == 0 or step == config.steps - 1:  # read the values back only now and then
            final = {"final_loss": round(loss.item(), 4), "final_batch_accuracy": round(accuracy.item(), 4)}
            progress.set_postfix(loss=f"{final['final_loss']:.3f}", acc=f"{final['final_batch_accuracy']:.2f}")
    model.eval()
    summary = {"recipe": asdict(config), "version": PRETRAINING_VERSION, **final, "num_people": len(people),
               "num_images": len(population), "example_caption": captions[0]}
    return model, processor, summary


def save_pretrained_weights(model: CCAFLModel, summary: dict, path: str | os.PathLike) -> Path:
    """Write ``model``'s state dict to a safetensors file whose metadata holds the recipe's
    ``fingerprint``, the ``summary`` of `pretrain_tiny_clip` and the torch build and CPU capability
    that made it. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = TinyCLIPPretrainingConfig(**summary["recipe"])
    metadata = {"fingerprint": config.fingerprint(), "summary": json.dumps(summary, sort_keys=True),
                "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path), metadata)
    return path


def read_weights_metadata(path: str | os.PathLike = SHIPPED_WEIGHTS) -> dict:
    """The metadata of a file written by `save_pretrained_weights` (``summary`` decoded)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if "fingerprint" not in metadata or "summary" not in metadata:
        raise ValueError(f"{path}: not a tiny-pretrained weights file (no fingerprint/summary metadata)")
    return {**metadata, "summary": json.loads(metadata["summary"])}


def load_pretrained_weights(path: str | os.PathLike = SHIPPED_WEIGHTS) -> tuple[CCAFLModel, CLIPProcessor]:
    """The model and processor of a file written by `save_pretrained_weights` (eval mode); its recipe
    is read from the metadata and must fit the weights exactly."""
    config = TinyCLIPPretrainingConfig(**read_weights_metadata(path)["summary"]["recipe"])
    model, processor = tiny_pretrained_architecture(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), processor


def rebuild_shipped_weights(path: str | os.PathLike = SHIPPED_WEIGHTS,
                            config: TinyCLIPPretrainingConfig | None = None, show_progress: bool = True) -> Path:
    """Pre-train ``config`` (default: the default recipe) and write its weights to ``path`` (default:
    the file shipped in the package). Returns the path."""
    model, _, summary = pretrain_tiny_clip(config, show_progress=show_progress)
    return save_pretrained_weights(model, summary, path)


def load_tiny_pretrained(config: TinyCLIPPretrainingConfig | None = None,
                         root: str | os.PathLike | None = None) -> tuple[CCAFLModel, CLIPProcessor]:
    """The pre-trained tiny CLIP of ``config`` (default: the default recipe).

    The default recipe loads the weights shipped with the package (no build). Any other recipe, or an
    explicit ``root``, is loaded from ``root`` (default `default_pretrained_root`), or pre-trained and
    saved there first (under a file lock and with `ccafl_hf.utils.cache.write_folder_atomically`: concurrent
    processes build it once and never see it half written).
    """
    config = config or TinyCLIPPretrainingConfig()
    if root is None and SHIPPED_WEIGHTS.is_file() and \
            read_weights_metadata(SHIPPED_WEIGHTS)["fingerprint"] == config.fingerprint():
        return load_pretrained_weights(SHIPPED_WEIGHTS)
    root = Path(root).expanduser() if root is not None else default_pretrained_root(config)
    root.parent.mkdir(parents=True, exist_ok=True)  # for the lock file
    with FileLock(str(root.parent / f".{root.name}.lock")):  # one process builds it, the others wait
        if not (root / PRETRAINING_FILE).is_file():
            if root.exists() and any(root.iterdir()):
                raise FileExistsError(f"{root} holds other files (no {PRETRAINING_FILE}); choose another root or "
                                      "delete it")
            logger.warning("pre-training the tiny CLIP on captioned synthetic people (first use of this recipe, "
                           "minutes on a CPU; cached in %s)", root)
            model, processor, summary = pretrain_tiny_clip(config)

            def write(folder: Path) -> None:
                model.save_pretrained(folder)
                processor.save_pretrained(folder)
                (folder / PRETRAINING_FILE).write_text(json.dumps(summary, indent=2))

            write_folder_atomically(root, write, ready=lambda folder: (folder / PRETRAINING_FILE).is_file())
    model = CCAFLModel.from_pretrained(root)
    return model, CLIPProcessor.from_pretrained(root)


def main(argv: list[str] | None = None) -> None:
    """``python -m ccafl_hf.tiny.pretraining [--output PATH]``: rebuild the shipped weights from the recipe."""
    parser = argparse.ArgumentParser(
        prog="python -m ccafl_hf.tiny.pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pre-train the tiny CLIP with the default recipe and write its weights (a safetensors file).")
    parser.add_argument("--output", default=str(SHIPPED_WEIGHTS), help="Weights file to write.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = rebuild_shipped_weights(args.output)
    summary = read_weights_metadata(path)["summary"]
    logger.info("wrote %s (%.0f KiB; final loss %s, batch accuracy %s)", path, path.stat().st_size / 1024,
                summary["final_loss"], summary["final_batch_accuracy"])


__all__ = [
    "SHIPPED_WEIGHTS",
    "TINY_PRETRAINED_NAME",
    "TinyCLIPPretrainingConfig",
    "clip_contrastive_loss",
    "default_pretrained_root",
    "load_pretrained_weights",
    "load_tiny_pretrained",
    "pretrain_tiny_clip",
    "read_weights_metadata",
    "rebuild_shipped_weights",
    "save_pretrained_weights",
    "tiny_pretrained_architecture",
]

if __name__ == "__main__":
    main()

"""What a finished run leaves: the loadable model folder, its card, and the Hub upload."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..trainers import CCAFLTrainingArguments
from .constants import ADAPTER_DIR, EVAL_FILE, TEXT_FEATURES_FILE
from .manifest import TEMP_PREFIX, remove
from .run_directory import LOCK_FILE, PID_FILE, RUN_FILE

logger = logging.getLogger(__name__)


def save_artifacts(model, processor, args, model_args, data_args, info, results: dict,
                   prompt_dir: Path | None = None) -> list[str]:
    """Write the loadable model (+ custom code), processor, prompt adapter and text features (copied from
    ``prompt_dir``, stage 1's results), ``eval_results.json`` and the card into the output folder: into a
    temporary folder there first, then each file renamed into place, ``eval_results.json`` last. Returns the
    written files, relative to the output folder."""
    from .model_card import render_model_card

    out = Path(args.output_dir)
    staging = out / f"{TEMP_PREFIX}{os.getpid()}-artifacts"
    remove(staging)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if prompt_dir is not None and (prompt_dir / ADAPTER_DIR).is_dir():
            shutil.copytree(prompt_dir / ADAPTER_DIR, staging / ADAPTER_DIR, dirs_exist_ok=True)
            shutil.copy2(prompt_dir / TEXT_FEATURES_FILE, staging / TEXT_FEATURES_FILE)
        render_model_card(model, args, model_args, data_args, info, results).save(staging / "README.md")
        (staging / EVAL_FILE).write_text(json.dumps(results, indent=2))
        files = sorted((p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()),
                       key=lambda name: name == EVAL_FILE)
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out / name)
    finally:
        remove(staging)
    return files


def push_output_dir(args: CCAFLTrainingArguments) -> str:
    """Upload the output folder (model, custom code, processor, adapter, text features, card — not the
    checkpoints, the run's manifest, its lock or temporary files) to the Hub in one commit. Returns the repo id."""
    from huggingface_hub import HfApi

    out = Path(args.output_dir)
    repo_id = args.hub_model_id or out.name
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=out,
                      ignore_patterns=["checkpoints/*", RUN_FILE, LOCK_FILE, PID_FILE, ".*", ".*/*"],
                      commit_message="Upload CCAFL model trained with ccafl-hf")
    logger.info("pushed %s to https://huggingface.co/%s", out, repo_id)
    return repo_id

"""What a finished run leaves: the loadable model folder, its card, and the Hub upload."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..trainers import CCAFLTrainingArguments
from .constants import ADAPTER_DIR, EVAL_FILE, TEXT_FEATURES_FILE
from .manifest import TEMP_PREFIX, remove, write_json
from .run_directory import RUN_FILE

logger = logging.getLogger(__name__)


def save_artifacts(model, processor, args, model_args, data_args, info, results: dict,
                   prompt_dir: Path | None = None) -> list[str]:
    """Write the loadable model, processor, prompt adapter and text features (from ``prompt_dir``), card and
    ``eval_results.json`` through a temporary folder, ``eval_results.json`` last. Returns the files written."""
    from .model_card import render_model_card

    out = Path(args.output_dir)
    staging = out / f"{TEMP_PREFIX}{os.getpid()}-artifacts"  # a killed run's: swept by the next run's plan
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if prompt_dir is not None and (prompt_dir / ADAPTER_DIR).is_dir():
            shutil.copytree(prompt_dir / ADAPTER_DIR, staging / ADAPTER_DIR, dirs_exist_ok=True)
            shutil.copy2(prompt_dir / TEXT_FEATURES_FILE, staging / TEXT_FEATURES_FILE)
        render_model_card(model, args, model_args, data_args, info, results).save(staging / "README.md")
        write_json(staging / EVAL_FILE, results)
        files = sorted((p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()),
                       key=lambda name: name == EVAL_FILE)
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out / name)
    finally:
        remove(staging)
    return files


def push_output_dir(args: CCAFLTrainingArguments) -> str:
    """Upload the output folder but its checkpoints, run manifest and hidden files to the Hub; returns the repo id."""
    from huggingface_hub import HfApi

    out = Path(args.output_dir)
    repo_id = args.hub_model_id or out.name
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=out,
                      ignore_patterns=["checkpoints/*", RUN_FILE, ".*", ".*/*"],
                      commit_message="Upload CCAFL model trained with ccafl-hf")
    logger.info("pushed %s to https://huggingface.co/%s", out, repo_id)
    return repo_id

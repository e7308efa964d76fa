"""What a finished run leaves: the loadable model folder, its card, and the Hub upload."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from ..trainers import (
    CCAFLTrainingArguments,
)
from .constants import ADAPTER_DIR, EVAL_FILE, TEXT_FEATURES_FILE
from .run_directory import (
    RUN_FILE,
    kill_point,
)

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- artifacts
def save_artifacts(model, processor, args, model_args, data_args, info, results: dict) -> None:
    """Write the loadable model (+ custom code), processor, adapter, text features, results and card.

    Everything is written into a temporary folder inside the output folder first, then each file is
    renamed into place, ``eval_results.json`` last: a reader never sees a file cut off, and a run killed
    here leaves no ``eval_results.json`` of its own (it is rewritten on resume).
    """
    from .model_card import render_model_card

    kill_point("before-artifacts")
    out = Path(args.output_dir)
    staging = out / f".tmp-{os.getpid()}-artifacts"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        prompt_final = Path(args.stage_output_dir("prompt")) / "final"
        if (prompt_final / ADAPTER_DIR).is_dir():
            shutil.copytree(prompt_final / ADAPTER_DIR, staging / ADAPTER_DIR, dirs_exist_ok=True)
            shutil.copy2(prompt_final / TEXT_FEATURES_FILE, staging / TEXT_FEATURES_FILE)
        render_model_card(model, args, model_args, data_args, info, results).save(staging / "README.md")
        (staging / EVAL_FILE).write_text(json.dumps(results, indent=2))
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == EVAL_FILE)
        for path in files:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    except (OSError, RuntimeError) as error:
        from .run_directory import describe_write_error

        line = describe_write_error(error, out)
        if line is None:
            raise
        raise OSError(errno.EIO, line) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push_output_dir(args: CCAFLTrainingArguments) -> str:
    """Upload the output folder (model, custom code, processor, adapter, text features, card — not the
    checkpoints, the run's state, its lock or temporary files) to the Hub in one commit. Returns the repo id."""
    from huggingface_hub import HfApi

    out = Path(args.output_dir)
    repo_id = args.hub_model_id or out.name
    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=out, ignore_patterns=["checkpoints/*", RUN_FILE, ".*", ".*/*"],
                      commit_message="Upload CCAFL model trained with ccafl-hf")
    logger.info("pushed %s to https://huggingface.co/%s", out, repo_id)
    return repo_id

"""The same recipe on one process or two (gloo, CPU): P×K is the global batch, each process draws P/N
identities, the steps per epoch are those of one process, and the final memories, classifier and weights
equal a one-process run's to float tolerance — with synchronised BatchNorm, its statistics too."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipe_worker import ITERS, K, P

WORKER = Path(__file__).parent / "recipe_worker.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(num_processes, data_dir, out_dir, configs, extra_env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CCAFL_HF_CACHE": str(out_dir / "cache"),
           **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
               "--master_port", str(_free_port()), str(WORKER), str(data_dir), str(out_dir), *configs]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(small_synthetic, tmp_path_factory):
    dataset, _ = small_synthetic
    data_dir = Path(dataset["train"][0]["image_path"]).parent.parent
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    _launch(1, data_dir, one, ["nobn", "syncbn", "layers"])
    log = _launch(2, data_dir, two, ["nobn", "syncbn", "nosync", "scaled", "layers"]).stderr
    load = lambda folder, config, rank=0: load_file(str(folder / f"{config}.rank{rank}.safetensors"))  # noqa: E731
    return load, one, two, log


def _assert_same_state(single, multi, prefixes, tolerance):
    keys = [k for k in single if k.startswith(prefixes)]
    assert keys
    for key in keys:
        torch.testing.assert_close(multi[key], single[key], rtol=tolerance, atol=tolerance, msg=key)


def test_two_processes_split_the_global_batch_with_the_same_steps(runs):
    load, one, two, _ = runs
    single = load(one, "nobn")
    ranks = [load(two, "nobn", rank) for rank in range(2)]
    assert int(single["world_size"]) == 1 and int(ranks[0]["world_size"]) == 2
    assert int(single["icdl.per_device_batch"]) == P * K and int(ranks[0]["icdl.per_device_batch"]) == P * K // 2
    assert single["steps"].tolist() == ranks[0]["steps"].tolist() == [ITERS, ITERS]  # optimiser steps (ICDL, ICAL)
    # step by step, rank 0's P/2 identities then rank 1's are the one-process batch
    assert ranks[0]["rows"].shape == (2 * ITERS, P * K // 2)
    torch.testing.assert_close(torch.cat([ranks[0]["rows"], ranks[1]["rows"]], dim=1), single["rows"], rtol=0, atol=0)


def test_without_batchnorm_two_processes_train_as_one(runs):
    """Losses on the gathered global batch, memories and classifier fed the whole batch once: after an ICDL
    and an ICAL epoch (association, adversarial loss included) the camera and cluster memories, the
    classifier and every weight of a 2-process run equal the 1-process run's (measured: within 2e-7)."""
    load, one, two, _ = runs
    single = load(one, "nobn")
    for rank in range(2):
        _assert_same_state(single, load(two, "nobn", rank), ("memory.", "cluster.", "classifier.", "model."), 1e-5)


def test_synchronised_batchnorm_gives_the_one_process_statistics(runs):
    load, one, two, log = runs
    single = load(one, "syncbn")
    synced = load(two, "syncbn")
    assert bool(synced["neck_synchronised"]) and not bool(single["neck_synchronised"])
    # measured: running statistics within 6e-5, memories within 1e-5 (float reduction order through the BN)
    _assert_same_state(single, synced, ("model.neck.", "memory.", "cluster.", "classifier.", "model."), 2e-4)
    assert "synchronised 1 BatchNorm layer(s) across 2 processes" in log
    # per-process statistics (sync off) are those of half a batch: not the one-process ones
    unsynced = load(two, "nosync")
    assert not bool(unsynced["neck_synchronised"])
    assert not torch.allclose(unsynced["model.neck.running_var"], single["model.neck.running_var"], atol=1e-4)


def test_synchronised_layers_equal_one_process_on_the_global_batch(runs):
    """Synchronised BatchNorm2d (RN50 tower) and BatchNorm1d with a frozen bias (BN neck) on CPU processes:
    outputs, input and weight gradients and running statistics (two steps) of one process on the whole
    batch, the per-process slices in rank order."""
    load, one, two, _ = runs
    single, ranks = load(one, "layers"), [load(two, "layers", rank) for rank in range(2)]
    for name in ("bn2d", "bn1d"):
        for key in ("out", "input_grad"):
            merged = torch.cat([ranks[0][f"{name}.{key}"], ranks[1][f"{name}.{key}"]])
            torch.testing.assert_close(merged, single[f"{name}.{key}"], rtol=1e-5, atol=1e-5)
        for key in ("weight_grad", "running_mean", "running_var"):
            for rank in ranks:
                torch.testing.assert_close(rank[f"{name}.{key}"], single[f"{name}.{key}"], rtol=1e-5, atol=1e-5)


def test_scale_batch_with_processes_keeps_whole_batches_per_process(runs):
    """Every process draws a whole P×K batch: per-device P×K, the same steps, two consecutive batches of the
    one-process stream per step — and the log says the recipe is not the preset's."""
    load, one, two, log = runs
    single = load(one, "nobn")
    ranks = [load(two, "scaled", rank) for rank in range(2)]
    assert int(ranks[0]["icdl.per_device_batch"]) == P * K and ranks[0]["steps"].tolist() == [ITERS]
    assert "not the preset's recipe" in log and "divide --iters_per_epoch by 2" in log
    stream = single["rows"][:ITERS]  # ICDL steps of the one-process run (same sampler seed, same stream)
    merged = torch.stack([ranks[step % 2]["rows"][step // 2] for step in range(2 * ITERS)])
    torch.testing.assert_close(merged[:ITERS], stream, rtol=0, atol=0)


def test_p_not_divisible_by_the_processes_is_one_error_line(monkeypatch, capsys):
    """Before any work: one `error:` line naming P, N and the nearest valid P (``WORLD_SIZE`` as set by
    `accelerate launch`); with --scale_batch_with_processes the same P is accepted."""
    from ccafl_hf.commands.train import parse_train_args, train_main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_main(["--num_identities_per_batch", "6", "--output_dir", "unused"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "P=6" in lines[0] and "N=4" in lines[0] and "--num_identities_per_batch 4 or 8" in lines[0]
    monkeypatch.setenv("RANK", "3")  # the other launched processes stay silent: one line in all
    assert train_main(["--num_identities_per_batch", "6", "--output_dir", "unused"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("WORLD_SIZE", "1")
    training_args = parse_train_args(["--num_identities_per_batch", "6", "--scale_batch_with_processes"])[2]
    assert training_args.scale_batch_with_processes


def test_print_settings_shows_the_batch_once(monkeypatch, tmp_path, capsys):
    """One process: the note gives the global and the per-process batch; a launched process other than the
    main one (``RANK`` > 0) prints nothing, so `accelerate launch` shows one copy."""
    from ccafl_hf.commands.train import train_main

    argv = ["--preset", "paper-market1501", "--output_dir", str(tmp_path / "out"), "--print_settings"]
    assert train_main(argv) == 0
    assert "note: stage-2/3 batch: global P×K = 16×8 = 128 images per step, per process 16×8 = 128 on 1 " \
           "process(es)" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert train_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "note:" not in captured.err


@pytest.mark.slow
def test_print_settings_under_a_launcher_shows_global_and_per_process_batch(tmp_path):
    """Two launched processes: one JSON (from the main process) and one note with both batch sizes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(Path(__file__).parents[1] / "scripts" / "train.py"), "--preset",
               "paper-market1501", "--output_dir", str(tmp_path / "out"), "--print_settings"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["training"]["num_identities_per_batch"] == 16
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: stage-2/3 batch")]
    assert notes == ["note: stage-2/3 batch: global P×K = 16×8 = 128 images per step, per process 8×8 = 64 on 2 "
                     "process(es)"]

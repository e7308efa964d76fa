"""Two CPU processes (gloo): memories, pseudo-labels, the classifier and the model weights are
identical on both ranks, with the memories and the classifier kept out of DDP's synchronisation."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_run_keeps_memories_and_pseudo_labels_identical(small_synthetic, tmp_path):
    dataset, _ = small_synthetic
    data_dir = Path(dataset["train"][0]["image_path"]).parent.parent
    worker = Path(__file__).parent / "distributed_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CCAFL_HF_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(worker), str(data_dir), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert int(ranks[0]["world_size"]) == 2
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=key)
    assert bool(ranks[0]["icdl.initialized"])
    assert (ranks[0]["ical.pseudo_labels"] >= 0).any()
    assert bool(ranks[0]["memories_out_of_ddp_sync"])
    # model weights (incl. the BN-neck statistics, synchronised from rank 0 before every extraction) agree
    assert any(key.startswith("model.neck.running_mean") for key in ranks[0])


def test_two_process_extraction_equals_one_process_in_dataset_order(small_synthetic, tmp_path):
    """Each process embeds every other batch (the last one short); both receive every feature, in dataset
    order, equal to a one-process extraction; with or without an Accelerator passed in."""
    from ccafl_hf import create_tiny_model
    from ccafl_hf.data import ReIDCollator, build_eval_transform
    from ccafl_hf.evaluation import extract_features
    from distributed_worker import EXTRACT_BATCH, EXTRACT_ROWS

    dataset, _ = small_synthetic
    data_dir = Path(dataset["train"][0]["image_path"]).parent.parent
    worker = Path(__file__).parent / "distributed_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CCAFL_HF_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(worker), str(data_dir), str(tmp_path), "extract"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    model, processor = create_tiny_model(seed=0)
    collator = ReIDCollator(build_eval_transform(64, 32, processor.image_processor.image_mean,
                                                 processor.image_processor.image_std))
    rows = dataset["query"].select(range(EXTRACT_ROWS))
    single = extract_features(model, rows, collator, batch_size=EXTRACT_BATCH, with_alignment=True, progress=False)
    assert single.labels["pids"].tolist() == rows["pid"]
    saved_by_rank = [load_file(str(tmp_path / f"extract{rank}.safetensors")) for rank in range(2)]
    for name in ("state", "accelerator"):  # each process embedded 2 batches of 2 (the last short one padded)
        assert [int(saved[f"{name}.embedded"]) for saved in saved_by_rank] == [4, 4]
    for saved in saved_by_rank:
        for name in ("state", "accelerator"):
            assert saved[f"{name}.pids"].tolist() == rows["pid"], name
            torch.testing.assert_close(saved[f"{name}.reid"], single.reid_features, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(saved[f"{name}.align"], single.alignment_features, rtol=1e-5, atol=1e-5)


def test_close_process_group_ends_the_group_and_is_a_no_op_without_one(tmp_path):
    """The end of a multi-process command: the group is destroyed before the interpreter's exit (left to the
    exit, gloo's threads are torn down during finalization and a rank may abort with SIGABRT)."""
    import torch.distributed as dist

    from ccafl_hf.utils.processes import close_process_group

    close_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    dist.all_reduce(torch.ones(1))
    close_process_group()
    assert not dist.is_initialized()

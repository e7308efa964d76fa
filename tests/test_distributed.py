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

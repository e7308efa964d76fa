#!/usr/bin/env python
"""Evaluate a trained CCAFL model on a ReID dataset (Market-1501 protocol).

    python scripts/evaluate.py --model outputs/ccafl-demo --dataset synthetic --output results.json
    python scripts/evaluate.py --model outputs/market --dataset dukemtmc --data_dir /data/DukeMTMC-reID \
        --bf16 --flip --save_ranked_lists outputs/ranked --num_lists 8

Runs under `accelerate launch` too (each process embeds a share). `--help` lists every flag.
"""

import sys

from ccafl_hf.commands.evaluate import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())

#!/usr/bin/env python
"""Embed, index and search image galleries with a trained CCAFL model; export it to ONNX.

    python scripts/retrieval.py embed --model outputs/ccafl-demo --images gallery/ --output gallery.safetensors
    python scripts/retrieval.py index --features gallery.safetensors --output gallery.faiss
    python scripts/retrieval.py search --gallery gallery.safetensors --index gallery.faiss \
        --query_images queries/ --model outputs/ccafl-demo --k 10 --save_ranked_lists outputs/search
    python scripts/retrieval.py export-onnx --model outputs/ccafl-demo --output ccafl.onnx
    python scripts/retrieval.py link --model outputs/ccafl-demo --data_dir videos/ --output outputs/links

`python scripts/retrieval.py SUBCOMMAND --help` lists each subcommand's flags.
"""

import sys

from ccafl_hf.commands.retrieval import retrieval_main

if __name__ == "__main__":
    sys.exit(retrieval_main())

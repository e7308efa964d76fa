#!/usr/bin/env python
"""Train CCAFL (prompt learning → ICDL → ICAL) and evaluate after each stage.

    accelerate launch scripts/train.py                      # embedded default: synthetic data, demo preset
    accelerate launch scripts/train.py --dataset market1501 --data_dir /data/Market-1501-v15.09.15 \
        --preset paper-market1501 --output_dir outputs/market
    python scripts/train.py --preset vit-b16-market1501 --print_settings   # what a preset resolves to

Every flag of `ccafl_hf.pipeline.ModelArguments`, `DataArguments` and
`ccafl_hf.trainers.CCAFLTrainingArguments` is accepted (`--help` lists them); a preset's values are
defaults that explicit flags override.
"""

import sys

from ccafl_hf.commands import train_main

if __name__ == "__main__":
    sys.exit(train_main())

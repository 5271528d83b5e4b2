"""Pre-training entry point; see ``pipeline/training/trainer.py`` and ``python run_pretrain.py --help``.

    deepspeed --num_gpus 8 run_pretrain.py --recipe base --data-prefix data/wiki --tokenizer tok/ --save runs/base
"""

import sys

from pipeline.errors import run_cli
from pipeline.training.trainer import main

if __name__ == "__main__":
    sys.exit(run_cli(main))

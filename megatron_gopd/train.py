"""``python -m megatron_gopd.train``: the trainer's entry point (:mod:`megatron_gopd.trainer.driver`).

Kept at the top level so that ``torchrun ... -m megatron_gopd.train`` (the recipes, the Slurm
launcher, the README) reads as what it does.
"""

import sys

from megatron_gopd.trainer.driver import main, train

__all__ = ["main", "train"]

if __name__ == "__main__":
    sys.exit(main())

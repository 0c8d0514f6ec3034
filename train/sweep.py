"""`python -m train.sweep ...`: K SAEs in lock-step on the same batches, one run folder per member.

Members: see train/members.py. `sweep.num_shards` and `sweep.shard` split them across processes
(Hydra multirun: `hydra.mode=MULTIRUN sweep.num_shards=4 sweep.shard=0,1,2,3`), each reading the
same cache.
"""
from __future__ import annotations

import sys

import hydra

from . import config  # noqa: F401  (registers the schemas)
from .cli import main_entry


@hydra.main(config_path="../conf", config_name="train_sweep", version_base="1.3")
def main(cfg) -> None:
    main_entry(cfg, single=False)


if __name__ == "__main__":
    sys.exit(main())

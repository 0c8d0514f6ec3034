"""`python -m train cache=... layer=L sublayer=S run_dir=RUN [overrides]`: one SAE (a sweep of one)."""
from __future__ import annotations

import sys

import hydra

from . import config  # noqa: F401  (registers the schemas)
from .cli import main_entry


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg) -> None:
    main_entry(cfg, single=True)


if __name__ == "__main__":
    sys.exit(main())

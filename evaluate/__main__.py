"""python -m evaluate run=<run folder | sweep folder | params.npz> [cache=...] (conf/eval.yaml)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import EvalConfig, register_configs
from .errors import clear_errors
from .run_eval import print_summary, run_evaluation

register_configs()


@hydra.main(config_path="../conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    config: EvalConfig = OmegaConf.to_object(cfg)
    with clear_errors():
        print_summary(run_evaluation(config))


if __name__ == "__main__":
    main()

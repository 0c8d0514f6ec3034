"""`make quality` / `python -m quality [hydra overrides]` (conf/quality.yaml)."""
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from .config import QualityConfig, register_configs

register_configs()


@hydra.main(config_path=str(Path(__file__).resolve().parent.parent / "conf"), config_name="quality",
            version_base=None)
def main(cfg) -> None:
    from .bench import run_quality
    config: QualityConfig = OmegaConf.to_object(cfg)
    run_quality(config)


if __name__ == "__main__":
    main()

"""python -m evaluate.browser run=<run folder | sweep member | params.npz | SAELens folder> (conf/features.yaml)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ..errors import clear_errors
from .build import build_browser
from .config import FeaturesConfig, register_configs

register_configs()


@hydra.main(config_path="../../conf", config_name="features", version_base=None)
def main(cfg: DictConfig) -> None:
    config: FeaturesConfig = OmegaConf.to_object(cfg)
    with clear_errors():
        out = build_browser(config)
    print(f"feature browser: {out / 'index.html'}  (open it in a browser; no server needed)")


if __name__ == "__main__":
    main()

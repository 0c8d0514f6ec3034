"""`make harvest` / `python -m harvest [hydra overrides]`."""
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from .config import HarvestConfig, register_configs

register_configs()


@hydra.main(config_path=str(Path(__file__).resolve().parent.parent / "conf"), config_name="harvest", version_base=None)
def main(cfg) -> None:
    from .errors import USER_ERRORS
    from .run import run_harvest
    from .summary import print_summary
    config: HarvestConfig = OmegaConf.to_object(cfg)
    try:
        summary = run_harvest(config)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the complete chunks of {config.cache} are kept; run the same command "
              "to resume", file=sys.stderr)
        sys.exit(130)
    if "statistics" in summary:
        print_summary(config.cache)


if __name__ == "__main__":
    main()

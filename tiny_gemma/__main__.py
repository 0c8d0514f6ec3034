"""`make tiny-model` / `python -m tiny_gemma [hydra overrides]`: rebuild the embedded Gemma 2."""
import sys
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from .config import TinyGemmaConfig, register_configs

register_configs()


@hydra.main(config_path=str(Path(__file__).resolve().parent.parent / "conf"), config_name="tiny_gemma",
            version_base=None)
def main(cfg) -> None:
    from .build import build
    from .corpus import CorpusError
    config: TinyGemmaConfig = OmegaConf.to_object(cfg)
    try:
        build(config)
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

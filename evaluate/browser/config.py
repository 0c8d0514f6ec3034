"""The dataclass schema behind conf/features.yaml (`make features RUN=...`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..config import SAESite


@dataclass
class FeaturesConfig(SAESite):
    """The cache, site, held-out rule and device: as for `make eval` (evaluate/config.py)."""
    # A run folder (or one member of a sweep), a Gemma Scope params.npz, or a SAELens folder.
    run: str = MISSING
    # The browser's folder; default: <run>/features (for a params.npz: <its folder>/features). A
    # previous browser there is replaced once the new one is complete; any other non-empty folder is refused.
    out: Optional[str] = None
    # Held-out tokens scanned in the one pass (null: all of them).
    max_tokens: Optional[int] = 1_048_576
    batch_sequences: int = 8             # held-out sequences read at a time
    # Tokens encoded at a time, at most (fewer for wide SAEs: the [tokens, d_sae] codes stay under 1 GB).
    encode_tokens: int = 4096
    top_contexts: int = 20               # per latent: the held-out sequences where it peaks highest
    # Per latent, a uniform random sample of its firings (this many) from which the quantile bands
    # draw their examples; bands are consecutive quantiles of that sample's activations.
    sample_size: int = 64
    quantiles: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.95])
    samples_per_band: int = 3
    context_before: int = 16             # tokens shown before the token of a context's activation
    context_after: int = 6
    histogram_bins: int = 64             # per latent, over [0, max) (a power of two)
    logit_tokens: int = 10               # tokens shown that the decoder direction promotes / suppresses
    dense_threshold: float = 0.1         # marked dense above this firing frequency
    shard_latents: int = 128             # latents per data file the browser loads on demand
    seed: int = 0
    # Seconds between saves of the pass's state (beside out), from which the same command resumes
    # after a crash; 0: never save.
    checkpoint_every_s: float = 300.0
    progress: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="features_schema", node=FeaturesConfig)

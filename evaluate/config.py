"""Dataclass schemas behind conf/eval.yaml, conf/export.yaml and conf/ablation.yaml.

Registered in Hydra's ConfigStore so that a misspelt key or a wrong type fails before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SAESite:
    """Where an SAE is read from the cache: shared by `make eval` and `make features`."""
    # The cache; default: the one recorded in the SAE's sae.json (required for params.npz).
    cache: Optional[str] = None
    # The site, for a params.npz (a run folder records its own; given here, they must agree).
    layer: Optional[int] = None
    sublayer: Optional[str] = None
    # Held-out rule for a params.npz without provenance.json (a released SAE); null: the trainer's
    # defaults, so it is evaluated on the same sequences as SAEs trained with them. Run folders always
    # use the rule recorded in their sae.json (anything else would evaluate on training data).
    heldout_fraction: Optional[float] = None
    heldout_seed: Optional[int] = None
    device: str = "auto"                 # auto: cuda when available, else cpu


@dataclass
class EvalConfig(SAESite):
    # A run folder, a sweep folder (one run folder per member), or a Gemma Scope params.npz.
    run: str = MISSING
    # More SAEs to put beside `run` in one report (table and plots), e.g. released Gemma Scope
    # params.npz files: evaluated on run's cache, site and held-out sequences unless they record theirs.
    compare: List[str] = field(default_factory=list)
    # Report folder; default: <run>/eval (for a params.npz: <its folder>/eval_<file stem>).
    out: Optional[str] = None
    # Held-out tokens used for the reconstruction metrics (null: all of them). Held-out sequences are
    # scattered, so each costs about one chunk read: 256k tokens of Gemma 2 2B read ~10 GB.
    max_tokens: Optional[int] = 262_144
    # Held-out sequences re-run through the model for delta LM loss (0: skip delta LM loss).
    delta_lm_sequences: int = 64
    batch_sequences: int = 8
    # Sequences per forward for delta LM loss (Gemma's 256k-vocabulary logits are large).
    delta_lm_batch_sequences: int = 4
    # A latent is dense when it fires on more than this fraction of held-out tokens.
    dense_threshold: float = 0.1
    # SAEBench's metrics (evaluate/saebench.py) take means over groups of this many held-out sequences
    # (SAEBench's batches of 16 prompts): explained variance, relative reconstruction bias.
    saebench_group_sequences: int = 16
    # Bins per decade of the log10 firing-frequency histogram.
    histogram_bins_per_decade: int = 10
    # Synthetic data: a .npy of the true feature directions [n_features, d_in]; adds feature recovery.
    true_features: Optional[str] = None
    plots: bool = True
    progress: bool = True


@dataclass
class ExportConfig:
    run: str = MISSING
    format: str = "gemmascope"          # gemmascope | saelens
    out: str = MISSING
    overwrite: bool = False
    # SAELens metadata; default: what sae.json and the cache's provenance record.
    model_name: Optional[str] = None
    dataset: Optional[str] = None


@dataclass
class AblationArm:
    preset: str = MISSING                 # conf/sae/<preset>.yaml (architecture and sparsity loss)
    knob: str = "sparsity_coeff"          # the sae.<field> that sets sparsity (k for TopK)
    levels: List[float] = field(default_factory=list)


@dataclass
class AblationConfig:
    cache: str = MISSING
    layer: int = MISSING
    sublayer: str = MISSING
    run_dir: str = MISSING
    # Every arm at every one of its levels, trained as ONE `python -m train.sweep` (lock-step).
    arms: List[AblationArm] = field(default_factory=list)
    # Training budget: auto picks `small` for caches under small_cache_tokens tokens, else `paper`.
    budget: str = "auto"
    small_cache_tokens: int = 50_000_000
    budgets: Dict[str, List[str]] = field(default_factory=dict)
    # Further train.sweep overrides, applied after the budget's (e.g. "sae.expansion=16").
    train_overrides: List[str] = field(default_factory=list)
    train: bool = True                    # false: only evaluate an existing ablation sweep in run_dir
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(run="${..run_dir}"))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="ablation_schema", node=AblationConfig)

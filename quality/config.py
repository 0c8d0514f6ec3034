"""Dataclass schema behind conf/quality.yaml (`make quality`), registered in Hydra's ConfigStore."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .synthetic import Regime


@dataclass
class LMCache:
    name: str = MISSING
    cache: str = MISSING                 # a harvested cache (make harvest)
    layer: int = MISSING
    sublayer: str = MISSING
    # This cache's own held-out fraction and delta-LM sequences (None: the benchmark's): a small cache
    # needs a larger share held out for its delta LM loss to be measured to a few percent.
    heldout_fraction: Optional[float] = None
    delta_lm_sequences: Optional[int] = None


@dataclass
class Budget:
    name: str = MISSING
    tokens: float = 5e6                  # training tokens per SAE
    batch_size: int = 1024
    lr: float = 2e-3                     # every trainer's learning rate at this budget
    lr_warmup_steps: int = 100
    sparsity_warmup_fraction: float = 0.1   # of the steps: lambda (or its peer's knob) ramped from 0
    caches: List[str] = field(default_factory=list)   # the caches run at this budget (names; []: every one)


@dataclass
class Arm:
    """One trainer recipe with a sweep of its sparsity knob. trainer=ours: `preset` is conf/sae/<preset>.yaml,
    `overrides` further sae./optim. keys (dotted), `knob` the sae. field swept. trainer=saelens: `preset`
    is the SAELens architecture/mode (jumprelu_step, jumprelu_tanh, jumprelu_quadratic, topk,
    batchtopk), `overrides` its config fields, `knob` the swept field."""
    name: str = MISSING
    trainer: str = "ours"                # ours | saelens
    preset: str = MISSING
    knob: str = MISSING
    levels: List[float] = field(default_factory=list)
    overrides: Dict[str, Any] = field(default_factory=dict)
    caches: List[str] = field(default_factory=list)   # the caches this arm is trained on (names; []: every one)


@dataclass
class Repeat:
    """Arms trained again at more seeds on some caches, compared by their mean over the seeds: where
    two trainers' frontiers cross within one seed's spread, one SAE per level cannot say who is ahead."""
    caches: List[str] = field(default_factory=list)     # cache names (regimes and LM caches)
    arms: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)      # beside `seeds`


@dataclass
class QualityConfig:
    out: str = "bench_out/quality"
    caches: str = "bench_out/quality/caches"   # synthetic caches, shared by every config that uses them
    regimes: List[Regime] = field(default_factory=list)
    lm_caches: List[LMCache] = field(default_factory=list)
    synthetic_tokens: int = 5_242_880    # tokens per synthetic cache (training rows + held-out)
    budgets: List[Budget] = field(default_factory=list)
    arms: List[Arm] = field(default_factory=list)
    width: int = 512                     # d_sae of every SAE (0: expansion x d_in)
    expansion: int = 8
    buffer_tokens: int = 262_144
    heldout_fraction: float = 0.02       # of sequences, never trained on; scored on up to eval_tokens
    eval_tokens: int = 131_072
    delta_lm_sequences: int = 64         # LM caches: held-out sequences re-run through the model
    match_threshold: float = 0.9         # a true feature is recovered when some decoder row has cos > this
    only_regimes: List[str] = field(default_factory=list)   # run these only (names), [] = all
    only_budgets: List[str] = field(default_factory=list)
    only_arms: List[str] = field(default_factory=list)
    # Train nothing: the report from the results already kept (arms not yet run are left out).
    report_only: bool = False
    # results.json of an earlier run (conf/quality.yaml: the committed docs/quality/results.json): an arm
    # whose identity is the same there is taken from it rather than retrained, on a fresh clone too.
    kept: str = ""
    # Every arm is trained at each of these seeds (initialisation and loader order; the caches and the
    # held-out rows stay), and `repeat`'s arms at its seeds too; a report of several seeds compares each
    # SAE's mean over its seeds, with the standard error of that mean (quality/seed_mean.py).
    seeds: List[int] = field(default_factory=lambda: [0])
    repeat: Repeat = field(default_factory=Repeat)
    device: str = "cpu"
    # torch threads of every trainer (same for all, so their speeds compare): on a loaded machine more
    # OpenMP threads than free cores spin at barriers and run many times slower than one.
    threads: int = 1
    progress: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="quality_schema", node=QualityConfig)

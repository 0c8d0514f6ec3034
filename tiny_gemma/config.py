"""Dataclass schema behind conf/tiny_gemma.yaml (`make tiny-model`), registered in Hydra's ConfigStore."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SourcePackage:
    package: str = MISSING               # a Debian package, fetched with `apt-get download`
    version: str = ""                    # pinned; "" or an unavailable version: the current one
    kind: str = MISSING                  # sphinx_sources (.rst.txt pages) | python_source (.py modules)
    root: str = MISSING                  # the folder inside the package
    exclude: List[str] = field(default_factory=list)   # python_source: packages left out (tests, ...)
    deb: Optional[str] = None            # a local .deb or unpacked folder instead of the download


@dataclass
class CorpusConfig:
    sources: List[SourcePackage] = field(default_factory=list)
    heldout_fraction: float = 0.05       # of documents (by a hash of their names), never trained on
    min_chars: int = 200                 # shorter documents are dropped
    max_chars: int = 8000                # source files are cut at top-level statements near this size


@dataclass
class LMTrainConfig:
    seed: int = 0
    context_length: int = 128
    batch_sequences: int = 32
    total_tokens: float = 8e6
    lr: float = 3e-3
    min_lr_fraction: float = 0.1         # cosine decay from lr to this fraction of it
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every_steps: int = 100
    eval_sequences: int = 256            # held-out sequences for the curve (the card uses all)
    checkpoint_every_steps: int = 200
    threads: int = 2                     # torch CPU threads: fixed, so that a rebuild gives the same bits
    max_steps_this_run: int = 0          # stop (with a checkpoint) after this many steps; rerun to resume


@dataclass
class TinyGemmaConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    vocab_size: int = 4096
    # transformers.Gemma2Config arguments besides vocab_size and the special-token ids.
    architecture: Dict[str, Any] = field(default_factory=dict)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    work_dir: str = ".cache/tiny_gemma"  # downloads, tokenized corpus, training checkpoints, logs
    out: str = MISSING                   # the checkpoint folder written at the end (shipped)
    bundled_out: str = MISSING           # the held-out documents, as the harvest's bundled corpus
    ablation_sequences: int = 256        # held-out sequences for the card's ablation figures
    progress: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="tiny_gemma_schema", node=TinyGemmaConfig)

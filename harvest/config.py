"""Dataclass schemas behind conf/harvest.yaml, conf/model/*.yaml and conf/data/*.yaml.

Registered in Hydra's ConfigStore so that a misspelt key or a wrong type fails before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    # A Hugging Face hub id, a local checkpoint folder, or "embedded:<name>" (harvest/tiny_model.py:
    # the shipped trained model, or random weights when `architecture` is given).
    path: str = MISSING
    revision: Optional[str] = None
    # "auto": bfloat16 on GPU, float32 on CPU.
    dtype: str = "auto"
    # "auto": eager on CPU, flex_attention on GPU (sdpa cannot soft-cap attention logits).
    attn_implementation: str = "auto"
    context_length: int = 1024
    harvest_tokens: int = 1_048_576       # the harvest's default n_tokens for this model
    # Architecture of the embedded model, and of the real ones for benchmarks with random weights.
    architecture: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    # bundled: the corpus shipped in harvest/corpus/; local: a file or folder of .txt/.jsonl/.parquet;
    # hub: a Hugging Face dataset streamed by name.
    kind: str = "bundled"
    path: Optional[str] = None
    dataset: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    # Documents are shuffled with this seed (hub datasets: within a streaming buffer of this many).
    shuffle_buffer: int = 10_000


@dataclass
class HarvestConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    cache: str = MISSING
    # "all", or a list such as "0,3,12" or "0-12".
    layers: str = "all"
    # "all", or a comma list of sublayer names (harvest.sites.SUBLAYERS).
    sublayers: str = "all"
    n_tokens: int = 1_048_576
    context_length: Optional[int] = None   # default: the model's context_length
    chunk_tokens: int = 8192              # rounded up to a multiple of the context length
    # Tokens per forward pass (whole sequences; at least one). It can change the last bits of the
    # activations, so a resumed harvest must keep it.
    batch_tokens: int = 8192
    seed: int = 0
    storage_dtype: str = "bfloat16"       # or float32
    codec: str = "none"                   # none | zstd | blosc
    checksum: bool = False                # crc32c on every chunk
    write_queue: int = 2                  # chunks in flight to the background writer
    # fdatasync every chunk's files before its `complete` flag: a power loss or kernel crash then
    # cannot leave a flag over data that never reached the disk (SIGKILL is safe either way).
    durable: bool = True
    # Threads writing one chunk's files; 0: one on CPU (the forward needs the cores), up to 8 on CUDA.
    write_threads: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    progress: bool = True
    # Refuse to start unless the disk keeps this much free after the cache is written.
    min_free_bytes: int = 64 * 2**20


def compose_harvest_config(overrides: list[str]) -> HarvestConfig:
    """conf/harvest.yaml with Hydra overrides, validated against the schema (as `python -m harvest`
    would see it), for benchmarks and tests that run a harvest in-process."""
    from pathlib import Path
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    register_configs()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        return OmegaConf.to_object(compose(config_name="harvest", overrides=list(overrides)))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="harvest_schema", node=HarvestConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)


class HarvestConfigError(ValueError):
    """A setting with a value outside its choices."""


CHOICES = {"storage_dtype": ("bfloat16", "float32"), "codec": ("none", "zstd", "blosc"),
           "device": ("auto", "cpu", "cuda")}


def validate(cfg: HarvestConfig) -> None:
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed and not (name == "device" and str(value).startswith("cuda:")):
            raise HarvestConfigError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
    for name in ("n_tokens", "chunk_tokens", "batch_tokens", "write_queue", "write_threads"):
        least = 0 if name in ("write_queue", "write_threads") else 1
        if getattr(cfg, name) < least:
            raise HarvestConfigError(f"{name}={getattr(cfg, name)} must be at least {least}")
    ctx = cfg.context_length or cfg.model.context_length
    if ctx < 2:
        raise HarvestConfigError(f"context_length={ctx}: need at least 2 (BOS and one token)")


# Fields that do not change the cache's bytes: a resumed harvest may differ in these.
RUNTIME_ONLY_FIELDS = ("write_queue", "device", "progress", "min_free_bytes", "durable", "write_threads")

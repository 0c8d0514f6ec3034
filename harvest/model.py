"""Loading a Gemma 2 checkpoint (hub id, local folder, or an embedded model) for harvesting."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .tiny_model import PREFIX, EmbeddedModelError, embedded_checkpoint


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module          # Gemma2ForCausalLM, eval mode
    tokenizer: object
    provenance: dict                # JSON-able: id, revision/hash, config, tokenizer, dtype, attention

    @property
    def config(self):
        return self.model.config


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]
    except KeyError:
        raise ModelLoadError(f"model.dtype={name!r}: choose auto, bfloat16, float32 or float16") from None


def resolve_attention(name: str, device: torch.device) -> str:
    if name == "auto":
        return "flex_attention" if device.type == "cuda" else "eager"
    if name == "sdpa":
        raise ModelLoadError("attn_implementation=sdpa cannot apply Gemma 2's attention-logit "
                             "soft-capping; use eager or flex_attention")
    return name


def checkpoint_location(cfg: ModelConfig) -> str:
    """The folder or hub id that transformers loads for this model config."""
    if cfg.path.startswith(PREFIX):
        try:
            return str(embedded_checkpoint(cfg.path[len(PREFIX):], dict(cfg.architecture)))
        except EmbeddedModelError as e:
            raise ModelLoadError(str(e)) from None
    return cfg.path


def load_model_config(cfg: ModelConfig):
    """The transformers config alone (no weights): enough to validate layers and widths."""
    from transformers import AutoConfig
    location = checkpoint_location(cfg)
    try:
        config = AutoConfig.from_pretrained(location, revision=cfg.revision)
    except (OSError, ValueError) as e:   # missing folder, unknown or gated hub id, no network
        raise ModelLoadError(
            f"cannot load model {cfg.path!r}: not a local checkpoint folder, and not reachable on the "
            f"Hugging Face hub (gated Gemma models need `huggingface-cli login` or HF_TOKEN). "
            f"Known names: conf/model/*.yaml. ({e.__class__.__name__}: {str(e).splitlines()[0]})") from e
    if config.model_type != "gemma2":
        raise ModelLoadError(f"{cfg.path!r} is a {config.model_type!r} model; this harvester reads Gemma 2")
    return config


FULL_HASH_BYTES = 2**30


def _checkpoint_hash(folder: Path) -> str:
    """sha256 over the JSON files and the weights: whole files up to 1 GiB of weights (the embedded
    model, whose weights depend on torch's initialisation), beyond that each safetensors header
    (names, dtypes, shapes, offsets) so that hashing stays cheap for real checkpoints."""
    h = hashlib.sha256()
    weights = sorted(folder.glob("*.safetensors"))
    whole = sum(f.stat().st_size for f in weights) <= FULL_HASH_BYTES
    for f in sorted(folder.glob("*.json")) + weights:
        h.update(f.name.encode())
        if f.suffix == ".safetensors" and not whole:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
        else:
            h.update(f.read_bytes())
    return h.hexdigest()


def load_model(cfg: ModelConfig, device: str | torch.device = "auto") -> LoadedModel:
    from transformers import AutoTokenizer, Gemma2ForCausalLM

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(cfg.dtype, device)
    attention = resolve_attention(cfg.attn_implementation, device)
    config = load_model_config(cfg)
    location = checkpoint_location(cfg)
    try:
        model = Gemma2ForCausalLM.from_pretrained(location, revision=cfg.revision, dtype=dtype,
                                                  attn_implementation=attention)
        tokenizer = AutoTokenizer.from_pretrained(location, revision=cfg.revision)
    except OSError as e:
        raise ModelLoadError(f"cannot load weights or tokenizer of {cfg.path!r}: {e}") from e
    model.to(device).eval().requires_grad_(False)

    local = Path(location)
    provenance = {
        "model": cfg.path,
        "model_name": cfg.name,
        "revision": cfg.revision or getattr(config, "_commit_hash", None),
        "checkpoint_hash": _checkpoint_hash(local) if local.is_dir() else None,
        "model_config": json.loads(config.to_json_string(use_diff=False)),
        "tokenizer": {"name_or_path": cfg.path, "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer)},
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attention,
        "device_type": device.type,
    }
    return LoadedModel(model=model, tokenizer=tokenizer, provenance=provenance)


def load_model_from_cache(cache_path: str | Path, device: str | torch.device = "auto") -> LoadedModel:
    """Rebuild the model a cache was harvested from, using its provenance attributes (`cache_path`:
    a local folder or an object-store URL)."""
    from .store import CacheLocation
    location = CacheLocation.parse(cache_path)
    attrs = dict(location.call("reading", location.open_group, "r").attrs)
    try:
        model_cfg = ModelConfig(**attrs["harvest_config"]["model"])
    except KeyError:
        raise ModelLoadError(f"cache {cache_path} records no harvest_config.model: not written by "
                             "this harvester; load the model with load_model() instead") from None
    return load_model(model_cfg, device)

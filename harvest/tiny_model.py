"""The embedded models: `tiny`, the Gemma 2 trained here and shipped as a checkpoint folder
(tiny_gemma/, rebuilt by `make tiny-model`), and random-weight Gemma 2s of any architecture built
from a fixed seed (`tiny-random` for tests that need speed more than meaning; the benchmarks'
gemma-2-2b-shaped model).

A model path `embedded:<name>` with an architecture is a random-weight model, written once as an
ordinary checkpoint folder; without one it is a shipped checkpoint. Both are then loaded by exactly
the code that loads real checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from tiny_gemma import CHECKPOINT

PREFIX = "embedded:"
SHIPPED = {"tiny": CHECKPOINT}
# Random-weight models share the trained model's tokenizer.
TOKENIZER_FILE = CHECKPOINT / "tokenizer.json"


class EmbeddedModelError(RuntimeError):
    pass


def default_checkpoint_root() -> Path:
    return Path(os.environ.get("JUMPSCOPE_HOME", Path(__file__).resolve().parent.parent / ".cache")) / "models"


def gemma2_config(architecture: dict, attn_implementation: str = "eager"):
    from transformers import Gemma2Config
    arch = {k: v for k, v in architecture.items() if k != "seed"}
    return Gemma2Config(pad_token_id=0, eos_token_id=1, bos_token_id=2,
                        attn_implementation=attn_implementation, **arch)


def architecture_fingerprint(architecture: dict) -> str:
    blob = json.dumps(dict(architecture), sort_keys=True).encode() + TOKENIZER_FILE.read_bytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def embedded_checkpoint(name: str, architecture: dict | None = None, root: Path | None = None) -> Path:
    """The checkpoint folder of embedded model `name`: shipped, or built from `architecture`."""
    if architecture:
        return ensure_checkpoint(name, architecture, root)
    if name not in SHIPPED:
        raise EmbeddedModelError(f"embedded model {name!r}: not shipped (shipped: {', '.join(SHIPPED)}), and "
                                 "no model.architecture to build random weights from")
    folder = SHIPPED[name]
    if not (folder / "model.safetensors").exists():
        raise EmbeddedModelError(f"the shipped checkpoint {folder} is missing: rebuild it with `make tiny-model`")
    return folder


def ensure_checkpoint(name: str, architecture: dict, root: Path | None = None) -> Path:
    """Build the random-weight model `name` into a checkpoint folder unless it is already there."""
    from transformers import Gemma2ForCausalLM, PreTrainedTokenizerFast

    root = Path(root or default_checkpoint_root())
    folder = root / f"{name}-{architecture_fingerprint(architecture)}"
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(int(architecture.get("seed", 0)))
    config = gemma2_config(architecture)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if config.vocab_size < len(tokenizer):
        raise EmbeddedModelError(f"architecture.vocab_size={config.vocab_size} is smaller than the "
                                 f"tokenizer's {len(tokenizer)} tokens")
    model = Gemma2ForCausalLM(config).to(torch.float32)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)   # atomic: a killed build never leaves a half-written checkpoint folder
    except OSError:          # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

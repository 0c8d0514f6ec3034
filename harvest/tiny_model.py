"""The embedded tiny Gemma 2: real module classes, toy sizes, random weights from a fixed seed.

It is written once as an ordinary checkpoint folder (config, safetensors weights, tokenizer) and then
loaded from that folder by exactly the code that loads real checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

CORPUS_DIR = Path(__file__).parent / "corpus"
TOKENIZER_FILE = CORPUS_DIR / "tiny_tokenizer.json"
PREFIX = "embedded:"


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


def ensure_checkpoint(name: str, architecture: dict, root: Path | None = None) -> Path:
    """Build the embedded model `name` into a checkpoint folder unless it is already there."""
    from transformers import Gemma2ForCausalLM, PreTrainedTokenizerFast

    root = Path(root or default_checkpoint_root())
    folder = root / f"{name}-{architecture_fingerprint(architecture)}"
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(int(architecture.get("seed", 0)))
    model = Gemma2ForCausalLM(gemma2_config(architecture)).to(torch.float32)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)   # atomic: a killed build never leaves a half-written checkpoint folder
    except OSError:          # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

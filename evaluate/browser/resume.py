"""Resuming the one pass after a crash: the collector's state, saved every `checkpoint_every_s`
seconds beside the browser's folder (`.<out>.collect.pt`, written aside and renamed), and picked up
by the same command if it was made for the same SAE, cache, held-out sequences and settings. The
resumed browser equals an uninterrupted one: the state holds the random generator, and the per-latent
selections do not depend on when they were merged."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# The settings that shape what the pass collects (the rest only shape the page).
PASS_SETTINGS = ("max_tokens", "batch_sequences", "encode_tokens", "top_contexts", "sample_size", "context_before",
                 "context_after", "histogram_bins", "seed")


def checkpoint_path(out: Path) -> Path:
    return out.parent / f".{out.name}.collect.pt"


def fingerprint(sae: torch.nn.Module, cache: str, layer: int, sublayer: str, heldout: dict, cfg) -> str:
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(repr((str(cache), int(layer), str(sublayer), sorted(heldout.items()),
                   [getattr(cfg, k) for k in PASS_SETTINGS])).encode())
    return h.hexdigest()


def load(path: Path, print_: bool, expected: str) -> Optional[dict]:
    """The saved state if it was made for `expected` (else None, and the stale file is removed)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        state = None
    if not state or state.get("fingerprint") != expected:
        path.unlink(missing_ok=True)
        return None
    if print_:
        print(f"resuming the pass from {path} ({state['done']:,} sequences done)", flush=True)
    return state


def save(path: Path, fingerprint_: str, done: int, tokens: np.ndarray, collector) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": fingerprint_, "done": done, "tokens": tokens[:done].copy(),
                "collector": collector.state_dict()}, tmp)
    os.replace(tmp, path)

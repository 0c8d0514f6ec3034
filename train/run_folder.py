"""A finished run folder: sae.safetensors (raw activation units) and sae.json (shared/DESIGN.md)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .sae import ARCHITECTURES, SparseAutoencoder

WEIGHTS, META = "sae.safetensors", "sae.json"

# What training, evaluation and Hydra put in a run or sweep folder; anything else makes it foreign.
RUN_FOLDER_FILES = re.compile(r"(sae\.safetensors|sae\.json|metrics\.jsonl|checkpoint(_shard\d+of\d+)?\.pt"
                              r"|multirun\.yaml|(__main__|train|sweep)\.log)(\.tmp)?")
RUN_FOLDER_DIRS = {".hydra", ".hydra_jobs", ".submitit", "tensorboard", "eval", "features"}   # features: the browser


class ForeignRunFolder(ValueError):
    """RUN names a folder that holds other files than a training's."""


def foreign_entries(folder: Path, depth: int = 1) -> list[str]:
    """The entries of `folder` that no training wrote; sub-folders (sweep members, multirun jobs)
    are judged by the same rule, `depth` levels down."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.is_symlink():
            if p.name in RUN_FOLDER_DIRS:
                continue
            inner = foreign_entries(p, depth - 1) if depth > 0 else [p.name + "/"]
            found += [f"{p.name}/{e}" for e in inner] if depth > 0 else inner
        elif not RUN_FOLDER_FILES.fullmatch(p.name):
            found.append(p.name)
    return found


def check_run_folder(run_dir) -> None:
    """Refuse a RUN that is a file, or a folder holding other files than a run's (checkpoints and
    weights would be written among them). Absent, empty, or a run or sweep folder: fine."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ForeignRunFolder(f"run_dir={str(run_dir)!r} is a file, not a folder; choose another RUN. "
                               "Nothing was written.")
    if not run_dir.is_dir():
        return
    found = foreign_entries(run_dir)
    if found:
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
        raise ForeignRunFolder(
            f"run_dir={str(run_dir)!r} holds files that no training wrote ({shown}); a run writes "
            "checkpoint.pt, sae.safetensors, sae.json, metrics.jsonl, tensorboard/ and .hydra/ into RUN, so "
            "RUN must be absent, empty, or a run or sweep folder. Choose a new folder; nothing was written.")


def save_sae(run_dir, sae: SparseAutoencoder, meta: dict) -> None:
    """Write `sae` (already in raw units) and `meta` (+ architecture, d_in, d_sae, tensor names)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sae.export_tensors().items()}
    meta = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "hyperparameters": sae.hyperparameters(), "tensors": sorted(tensors), **meta}
    save_file(tensors, str(run_dir / (WEIGHTS + ".tmp")), metadata={"architecture": sae.architecture})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(run_dir / (WEIGHTS + ".tmp"), 0o666 & ~umask)   # safetensors creates it private (0600)
    os.replace(run_dir / (WEIGHTS + ".tmp"), run_dir / WEIGHTS)
    (run_dir / (META + ".tmp")).write_text(json.dumps(meta, indent=2, default=_jsonable) + "\n")
    os.replace(run_dir / (META + ".tmp"), run_dir / META)


def load_sae(run_dir, device="cpu") -> tuple[SparseAutoencoder, dict]:
    """(sae, meta): the SAE in raw activation units (encode, decode, forward) and the parsed sae.json."""
    run_dir = Path(run_dir)
    if not (run_dir / META).exists() or not (run_dir / WEIGHTS).exists():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {META} + {WEIGHTS}: not a finished run folder")
    meta = json.loads((run_dir / META).read_text())
    arch = meta["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{run_dir}: unknown architecture {arch!r}")
    tensors = load_file(str(run_dir / WEIGHTS))
    sae = ARCHITECTURES[arch].from_tensors(**tensors, **meta.get("hyperparameters", {}))
    return sae.to(device).eval(), meta


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")

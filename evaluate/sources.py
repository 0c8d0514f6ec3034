"""What `run=` points at, resolved into SAEs to evaluate: a run folder (sae.json + sae.safetensors), a
sweep folder (one run folder per member), or a Gemma Scope params.npz (a released SAE, or our export
of one, which sits beside a provenance.json naming its site and cache)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import EvalInputError
from .gemmascope import load_params_npz
from .labels import architecture_label

PARAMS_FILE = "params.npz"
PROVENANCE_FILE = "provenance.json"     # written beside an exported params.npz


class RunError(EvalInputError):
    """`run=` does not point at something evaluable; the message says what is missing."""


@dataclass
class EvalTarget:
    name: str
    path: Path
    sae: torch.nn.Module
    meta: dict
    layer: int
    sublayer: str
    cache: str
    heldout: dict                  # {"fraction", "seed"}: the trainer's held-out rule
    metrics_file: Optional[Path] = None
    notes: list = field(default_factory=list)


def default_heldout() -> dict:
    from train.config import LoaderConfig
    d = LoaderConfig()
    return {"fraction": d.heldout_fraction, "seed": d.heldout_seed}


def _is_run_folder(p: Path) -> bool:
    return (p / "sae.json").is_file()


def _site(meta: dict, cfg, where: str) -> tuple[int, str, str]:
    """(layer, sublayer, cache): the config's values where given, else those recorded in `meta`;
    a disagreement between the two is an error rather than a silent choice."""
    values = {}
    for key in ("layer", "sublayer", "cache"):
        given, recorded = getattr(cfg, key), meta.get(key)
        if given is not None and recorded is not None and key != "cache" and str(given) != str(recorded):
            raise RunError(f"{where} was trained on {key}={recorded!r} but {key}={given!r} was asked for")
        values[key] = given if given is not None else recorded
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise RunError(f"{where} records no {', '.join(missing)}: pass {' '.join(k + '=...' for k in missing)}")
    return int(values["layer"]), str(values["sublayer"]), str(values["cache"])


def load_run_folder(path: Path, cfg, device: str = "cpu") -> EvalTarget:
    from train.run_folder import load_sae
    meta_file, weights = path / "sae.json", path / "sae.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        missing = [f.name for f in (meta_file, weights) if not f.is_file()]
        raise RunError(f"run folder {str(path)!r} has no final SAE: {' and '.join(missing)} missing "
                       f"(training unfinished or interrupted? it holds: {', '.join(present) or 'nothing'})")
    sae, meta = load_sae(path, device=device)
    layer, sublayer, cache = _site(meta, cfg, f"run {str(path)!r}")
    metrics = path / "metrics.jsonl"
    return EvalTarget(name=path.name, path=path, sae=sae, meta=meta, layer=layer, sublayer=sublayer,
                      cache=cache, heldout=dict(meta.get("heldout") or default_heldout()),
                      metrics_file=metrics if metrics.is_file() else None)


def load_params(path: Path, cfg, device: str = "cpu") -> EvalTarget:
    sae = load_params_npz(path).to(device).eval()
    provenance_file = path.parent / PROVENANCE_FILE
    meta = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    # Our export keeps its architecture label (a ReLU SAE is a JumpReLU at threshold 0); a file
    # without provenance is a release, labelled apart from what we trained.
    label = architecture_label(meta) if meta.get("architecture") else "gemma-scope"
    meta = {**meta, "architecture": "jumprelu", "label": label, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "source": "params.npz"}
    layer, sublayer, cache = _site(meta, cfg, f"params file {str(path)!r}")
    # A released SAE never saw our cache; the trainer's default held-out rule puts it on the same
    # sequences as the SAEs we train, so the two can be compared side by side.
    heldout = dict(meta.get("heldout") or default_heldout())
    if cfg.heldout_fraction is not None:
        heldout["fraction"] = float(cfg.heldout_fraction)
    if cfg.heldout_seed is not None:
        heldout["seed"] = int(cfg.heldout_seed)
    name = path.parent.name if path.name == PARAMS_FILE else path.stem
    return EvalTarget(name=name, path=path, sae=sae, meta=meta, layer=layer, sublayer=sublayer, cache=cache,
                      heldout=heldout)


def resolve(cfg, device: str = "cpu") -> tuple[list[EvalTarget], bool]:
    """(targets, is_sweep) for cfg.run."""
    path = Path(cfg.run)
    if not path.exists():
        raise RunError(f"run={str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise RunError(f"run={str(path)!r} is a file but not a Gemma Scope .npz")
        return [load_params(path, cfg, device)], False
    if _is_run_folder(path) or (path / "sae.safetensors").is_file():
        return [load_run_folder(path, cfg, device)], False
    if (path / PARAMS_FILE).is_file():
        return [load_params(path / PARAMS_FILE, cfg, device)], False
    members = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_folder(p))
    if members:
        unfinished = sorted(p.name for p in path.iterdir() if p.is_dir() and not _is_run_folder(p)
                            and any(p.iterdir()) and not p.name.startswith((".", "eval")))
        targets = [load_run_folder(p, cfg, device) for p in members]
        for t in targets:
            if unfinished:
                t.notes.append(f"sweep members without a final SAE, not evaluated: {', '.join(unfinished)}")
        return targets, True
    present = sorted(p.name for p in path.iterdir())
    raise RunError(f"{str(path)!r} is neither a run folder (no sae.json + sae.safetensors: training "
                   f"unfinished?), nor a sweep folder (no member holds one), nor holds a {PARAMS_FILE}. "
                   f"It holds: {', '.join(present) or 'nothing'}")

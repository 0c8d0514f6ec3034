"""`make export RUN=<run dir> FORMAT=gemmascope|saelens OUT=<folder>` (conf/export.yaml).

Run folders hold SAEs in raw activation units already: the trainer folds the normalisation constant
c in when it saves (`SparseAutoencoder.folded`: biases and thresholds times c, weights unchanged), so
exports need no c and give, on raw activations, c times what the trained SAE gives on x / c. The folder is written next to OUT and
renamed into place, and an existing OUT is never replaced unless overwrite=true.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import ExportConfig, register_configs
from .errors import EvalInputError, clear_errors
from .gemmascope import params_from_sae, write_params
from .labels import architecture_label, sparsity_setting
from .saelens import write_saelens
from .sources import PARAMS_FILE, PROVENANCE_FILE, RunError, load_run_folder

FORMATS = ("gemmascope", "saelens")


class ExportError(EvalInputError):
    pass


def cache_facts(cache: str) -> dict:
    """Context length, model id and data source recorded in a cache, where it can be read."""
    try:
        from train.cache_reader import open_cache      # a local folder or an object-store URL
        attrs = dict(open_cache(cache).attrs)
    except Exception:
        return {}
    harvest = attrs.get("harvest_config") if isinstance(attrs.get("harvest_config"), dict) else {}
    model_id = _model_id(attrs.get("model")) or (harvest.get("model") or {}).get("path")
    data = next((attrs[k] for k in ("data_source", "data") if attrs.get(k) is not None), harvest.get("data"))
    if isinstance(data, dict):
        data = (data.get("dataset") or data.get("path") or data.get("source")
                or (f"{data['kind']}:{data.get('file', '')}" if data.get("kind") else None))
    return {"context_length": attrs.get("context_length"), "model": model_id, "dataset": data}


def _model_id(model) -> Optional[str]:
    """sae.json's `model` is the cache's model record: a dict (id, revision, ...) or a plain name."""
    if isinstance(model, dict):
        return model.get("id") or model.get("model") or model.get("path") or model.get("model_name")
    return model


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"out={str(out)!r} exists and is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"out={str(out)!r} already exists and is not empty; choose another OUT or pass "
                          "ARGS=overwrite=true to replace it")


def export(cfg: ExportConfig) -> Path:
    if cfg.format not in FORMATS:
        raise ExportError(f"format={cfg.format!r}: choose one of {', '.join(FORMATS)}")
    run = Path(cfg.run)
    if not run.is_dir():
        raise RunError(f"run={str(run)!r} is not a run folder")
    members = sorted(p.name for p in run.iterdir() if (p / "sae.json").is_file())
    if members and not (run / "sae.json").exists():
        raise ExportError(f"run={str(run)!r} is a sweep folder; export one of its {len(members)} members, "
                          f"e.g. RUN={run / members[0]}")
    out = Path(cfg.out)
    _prepare_out(out, cfg.overwrite)
    settings = SimpleNamespace(layer=None, sublayer=None, cache=None)
    target = load_run_folder(run, settings, device="cpu")
    facts = cache_facts(target.cache)
    model_name: Optional[str] = cfg.model_name or _model_id(target.meta.get("model")) or facts.get("model")
    dataset: Optional[str] = cfg.dataset or facts.get("dataset")
    provenance = {"model": model_name, "layer": target.layer, "sublayer": target.sublayer,
                  "cache": target.cache, "heldout": target.heldout, "architecture": target.meta.get("architecture"),
                  "context_length": facts.get("context_length"), "dataset": dataset, "run": str(run),
                  "normalisation": target.meta.get("normalisation") or target.meta.get("normalisation_constant"),
                  "hyperparameters": target.meta.get("hyperparameters"),
                  "label": architecture_label(target.meta), "sparsity": sparsity_setting(target.meta)}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if cfg.format == "gemmascope":
            write_params(params_from_sae(target.sae), staging / PARAMS_FILE)
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        else:
            write_saelens(target.sae, staging, layer=target.layer, sublayer=target.sublayer,
                          model_name=model_name, context_size=facts.get("context_length"), dataset=dataset,
                          extra={"jumpscope": provenance})
        if out.exists():
            shutil.rmtree(out)   # only reached for an empty folder or with overwrite=true
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


register_configs()


@hydra.main(config_path="../conf", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    with clear_errors():
        out = export(OmegaConf.to_object(cfg))
    print(f"exported {cfg.run} as {cfg.format} to {out}")


if __name__ == "__main__":
    main()

"""The JSON report of one SAE and the table of a sweep (markdown for people, CSV for programs)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
import numpy as np

from .labels import architecture_label, sparsity_setting
from .saebench import TABLE_METRICS, table_values
from .sources import EvalTarget

TABLE_COLUMNS = ("name", "architecture", "sparsity", "d_sae", "l0", "fvu", "mse", "dead_fraction",
                 "dense_fraction", "delta_ce", "delta_ce_se", "fraction_recovered", "fraction_recovered_mean", "kl_spliced",
                 "ce_clean", "ce_zero", "ce_mean")


def build_report(target: EvalTarget, result: dict) -> dict:
    rec = result["reconstruction"]
    return {
        "name": target.name,
        "source": str(target.path),
        "architecture": target.meta.get("architecture"),
        "label": architecture_label(target.meta),
        "sparsity": sparsity_setting(target.meta),
        "d_in": target.sae.d_in,
        "d_sae": target.sae.d_sae,
        "model": target.meta.get("model"),
        "cache": target.cache,
        "layer": target.layer,
        "sublayer": target.sublayer,
        "heldout": result["heldout"],
        "hyperparameters": target.meta.get("hyperparameters"),
        "reconstruction": rec.summary(),
        "delta_lm": result["delta_lm"],
        "saebench": result.get("saebench"),
        "feature_recovery": result.get("feature_recovery"),
        "firing_frequency_histogram": firing_histogram(rec.firing_frequency, rec.n_tokens),
        "firing_frequency": rec.firing_frequency,
        "mse_by_position": rec.mse_by_position,
        "fvu_by_position": rec.fvu_by_position,
        "dense_threshold": rec.dense_threshold,
        "training_final_metrics": target.meta.get("final_metrics") or target.meta.get("metrics"),
        "notes": target.notes,
    }


def firing_histogram(freq: list[float], n_tokens: int, bins_per_decade: int = 4) -> dict:
    """Counts of latents per log10 firing-frequency bin, from 1/n_tokens (fired once) up to 1."""
    f = np.asarray(freq, dtype=float)
    lo = math.floor(math.log10(1.0 / max(n_tokens, 1)))
    edges = np.linspace(lo, 0.0, -lo * bins_per_decade + 1)
    counts, _ = np.histogram(np.log10(f[f > 0]), bins=edges)
    return {"log10_edges": edges.tolist(), "counts": counts.tolist(), "dead": int((f == 0).sum())}


def json_safe(v):
    """NaN and infinities become null: strict JSON readers (browsers, jq) reject them."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")


def table_row(report: dict) -> dict:
    lm = report["delta_lm"]
    row = {"name": report["name"], "architecture": report["label"], "sparsity": report["sparsity"],
           "d_sae": report["d_sae"], **report["reconstruction"]}
    for k in ("delta_ce", "delta_ce_se", "fraction_recovered", "fraction_recovered_mean", "kl_spliced", "ce_clean",
              "ce_zero", "ce_mean"):
        row[k] = lm.get(k, float("nan"))
    row.update(table_values(report.get("saebench")))
    columns = TABLE_COLUMNS + tuple(name for _, name in TABLE_METRICS)
    if report.get("feature_recovery"):
        row["feature_mmcs"] = report["feature_recovery"]["mean_max_cosine"]
        columns = columns + ("feature_mmcs",)
    return {k: row.get(k) for k in columns}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_table(reports: list[dict], folder: Path) -> list[dict]:
    rows = sorted((table_row(r) for r in reports), key=lambda r: (r["architecture"], r["l0"]))
    columns = max((tuple(r) for r in rows), key=len)
    with open(folder / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    return rows

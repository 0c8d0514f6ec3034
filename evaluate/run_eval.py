"""`make eval RUN=...`: evaluate a run folder, a sweep folder or a Gemma Scope params.npz, and write
report.json per SAE plus (for several SAEs) table.md / table.csv and the plots into the report folder."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from . import plots
from .evaluation import evaluate_targets
from .features import feature_recovery, load_features
from .report import build_report, write_json, write_table
from .sources import EvalTarget, resolve


def compared_targets(cfg, first: EvalTarget) -> list[EvalTarget]:
    """The SAEs of cfg.compare, defaulting to the site, cache and held-out sequences of `first`."""
    out = []
    for path in cfg.compare:
        sub = dataclasses.replace(
            cfg, run=str(path), compare=[],
            layer=cfg.layer if cfg.layer is not None else first.layer,
            sublayer=cfg.sublayer if cfg.sublayer is not None else first.sublayer,
            cache=cfg.cache if cfg.cache is not None else first.cache,
            heldout_fraction=cfg.heldout_fraction if cfg.heldout_fraction is not None else first.heldout["fraction"],
            heldout_seed=cfg.heldout_seed if cfg.heldout_seed is not None else first.heldout["seed"])
        out += resolve(sub, device=cfg.device)[0]
    return out


def _unique_names(targets: list[EvalTarget]) -> None:
    seen: dict[str, int] = {}
    for t in targets:
        if t.name in seen:
            seen[t.name] += 1
            t.name = f"{t.name}_{seen[t.name]}"
        else:
            seen[t.name] = 0


def report_folder(cfg, targets: list[EvalTarget], is_sweep: bool) -> Path:
    if cfg.out:
        return Path(cfg.out)
    run = Path(cfg.run)
    if run.is_file():
        return run.parent / ("eval" if run.name == "params.npz" else f"eval_{run.stem}")
    return run / "eval"


def run_evaluation(cfg) -> dict:
    """Evaluate what cfg.run points at; returns {"folder", "reports", "rows", "plots"}."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    targets, is_sweep = resolve(cfg, device=cfg.device)
    if cfg.compare:
        targets = targets + compared_targets(cfg, targets[0])
        is_sweep = True
        _unique_names(targets)
    results = evaluate_targets(targets, cfg)
    if cfg.true_features:
        for t, r in zip(targets, results):
            r["feature_recovery"] = feature_recovery(t.sae.W_dec, load_features(cfg.true_features, t.sae.d_in))
    reports = [build_report(t, r) for t, r in zip(targets, results)]
    folder = report_folder(cfg, targets, is_sweep)
    folder.mkdir(parents=True, exist_ok=True)
    if is_sweep:
        for t, rep in zip(targets, reports):
            write_json(rep, folder / t.name / "report.json")
    else:
        write_json(reports[0], folder / "report.json")
    rows = write_table(reports, folder)
    drawn = []
    if cfg.plots:
        title = f"layer {targets[0].layer} {targets[0].sublayer}"
        drawn = plots.draw_all(reports, [t.metrics_file for t in targets], folder, title,
                               cfg.histogram_bins_per_decade)
    return {"folder": folder, "reports": reports, "rows": rows, "plots": drawn}


def print_summary(outcome: dict) -> None:
    rows = outcome["rows"]
    width = max([len(r["name"]) for r in rows] + [4])
    for row in rows:
        lm, se = row["delta_ce"], row.get("delta_ce_se")
        se = f" ± {se:.2g}" if isinstance(se, float) and math.isfinite(se) else ""
        lm = (f"  delta CE {lm:.4g}{se}  recovered {row['fraction_recovered']:.4g} (vs zero-ablation), "
              f"{row['fraction_recovered_mean']:.4g} (vs mean-ablation)"
              if isinstance(lm, float) and math.isfinite(lm) else "")
        print(f"{row['name']:<{width}}  {row['architecture']:<12} {row['sparsity']:<14} L0 {row['l0']:8.3f}  "
              f"FVU {row['fvu']:.4f}  dead {row['dead_fraction']:.3f}  dense {row['dense_fraction']:.3f}{lm}")
    print(f"report: {outcome['folder']}")

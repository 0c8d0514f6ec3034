"""`make ablation LAYER=.. SUBLAYER=..` (conf/ablation.yaml): the JumpReLU paper's comparison on one cache.

Every arm (architecture + sparsity loss) at each of its sparsity levels is one member of ONE
`python -m train.sweep` (lock-step, one read of the cache); then the sweep is evaluated like any
other (`make eval RUN=<run_dir>`), and the arms are compared at equal L0 by interpolating each arm's
frontier in log L0:
  jumprelu+l0 vs jumprelu+l1  -> the effect of the L0 penalty (same activation)
  jumprelu+l1 vs relu+l1      -> the effect of the JumpReLU activation (same penalty)
  jumprelu+l0 vs relu+l1      -> both
Outputs in <run_dir>/eval: ablation.md, ablation.json, ablation_frontier.png, and the sweep report.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from .config import AblationConfig, register_configs
from .equal_l0 import MAX_L0_GAP, comparison_l0s, covers, finite as _finite, frontier
from .errors import EvalInputError, clear_errors
from .report import json_safe
from .run_eval import print_summary, run_evaluation

QUESTIONS = (
    ("jumprelu+l0", "jumprelu+l1", "the L0 penalty (both JumpReLU)"),
    ("jumprelu+l1", "relu+l1", "the JumpReLU activation (both L1)"),
    ("jumprelu+l0", "relu+l1", "JumpReLU and L0 together"),
    ("jumprelu+l0", "topk", "JumpReLU+L0 against TopK"),
    ("jumprelu+l0", "gated+l1", "JumpReLU+L0 against Gated"),
)
METRICS = (("fvu", "FVU"), ("delta_ce", "delta LM loss"))


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_members(cfg: AblationConfig) -> list[dict]:
    """train.sweep members: one per arm and level, named <preset>_<knob>=<level>."""
    if not cfg.arms:
        raise EvalInputError("ablation has no arms: list them under `arms` (conf/ablation.yaml)")
    members = []
    for arm in cfg.arms:
        if not arm.levels:
            raise EvalInputError(f"ablation arm {arm.preset!r} has no sparsity levels")
        for level in arm.levels:
            value = int(level) if arm.knob == "k" else float(level)
            members.append({"preset": arm.preset, "name": f"{arm.preset}_{arm.knob}={_label(value)}",
                            "sae": {arm.knob: value}})
    return members


def budget_overrides(cfg: AblationConfig) -> list[str]:
    budget = cfg.budget
    if budget == "auto":
        from train.cache_reader import open_cache
        n_tokens = int(open_cache(cfg.cache).attrs["n_tokens"])
        budget = "small" if n_tokens < cfg.small_cache_tokens else "paper"
        print(f"[ablation] budget=auto: cache of {n_tokens:,} tokens -> budget={budget}")
    if budget not in cfg.budgets:
        raise EvalInputError(f"budget={budget!r}: choose auto or one of {', '.join(cfg.budgets)}")
    return list(cfg.budgets[budget])


def _hydra_value(v) -> str:
    """A member list as a Hydra override value (names quoted: they contain '=')."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("'", "\\'") + "'"
    return repr(v)


def sweep_command(cfg: AblationConfig) -> list[str]:
    return [sys.executable, "-m", "train.sweep", f"cache={_hydra_value(str(cfg.cache))}", f"layer={cfg.layer}",
            f"sublayer={cfg.sublayer}", f"run_dir={_hydra_value(str(cfg.run_dir))}", "sweep=ablation",
            f"sweep.members={_hydra_value(sweep_members(cfg))}", *budget_overrides(cfg), *cfg.train_overrides]


def train_sweep(cfg: AblationConfig) -> None:
    cmd = sweep_command(cfg)
    print("[ablation] " + " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise SystemExit(f"[ablation] the sweep failed (exit {done.returncode}); see its output above")


def compare_at_equal_l0(rows: list[dict], questions=QUESTIONS, metrics=METRICS) -> list[dict]:
    """For each question (arm a, arm b, text): both arms' metric at the L0 of each of their SAEs inside
    both frontiers (log-L0 interpolation, only where both sweeps cover the L0: evaluate/equal_l0.py);
    rows name their arm under "architecture". Metrics no SAE has (delta LM
    loss on a cache without a model) are left out."""
    out = []
    metrics = [(m, n) for m, n in metrics if any(_finite(r.get(m)) for r in rows)]
    for a, b, question in questions:
        for metric, metric_name in metrics:
            xa, ya = frontier(rows, "architecture", a, metric)
            xb, yb = frontier(rows, "architecture", b, metric)
            entry = {"question": question, "a": a, "b": b, "metric": metric, "points": []}
            if len(xa) == 0 or len(xb) == 0:
                entry["note"] = f"no {metric_name} for {a if len(xa) == 0 else b}"
            else:
                lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
                if lo > hi:
                    entry["note"] = (f"L0 ranges do not overlap ({a}: {math.exp(xa[0]):.3g}-{math.exp(xa[-1]):.3g}, "
                                     f"{b}: {math.exp(xb[0]):.3g}-{math.exp(xb[-1]):.3g}); widen the levels")
                else:
                    for x in comparison_l0s([xa, xb], lo, hi):
                        if not (covers(xa, x) and covers(xb, x)):
                            continue            # in a gap of a sweep (MAX_L0_GAP)
                        va, vb = float(np.interp(x, xa, ya)), float(np.interp(x, xb, yb))
                        # a relative difference means something only against a positive baseline
                        # (delta CE can be zero or negative: noise around an unchanged loss)
                        entry["points"].append({"l0": float(math.exp(x)), a: va, b: vb, "difference": va - vb,
                                                "relative": (va - vb) / vb if vb > 0 else None})
                    if not entry["points"]:
                        entry["note"] = (f"no L0 where both sweeps have SAEs at most {MAX_L0_GAP:g}x apart; "
                                         "add levels")
            out.append(entry)
    return out


def _verdict(entry: dict) -> str:
    pts = entry["points"]
    if not pts:
        return f"- {entry['question']} ({entry['metric']}): {entry.get('note', 'no data')}"
    mean_diff = sum(p["difference"] for p in pts) / len(pts)
    rel = [p["relative"] for p in pts]
    relative = f" ({100 * sum(rel) / len(rel):+.1f}%)" if all(r is not None for r in rel) else ""
    better = entry["a"] if mean_diff < 0 else entry["b"]
    return (f"- {entry['question']} ({entry['metric']}, lower is better): {entry['a']} minus {entry['b']} is "
            f"{mean_diff:+.4g}{relative} on average over L0 {pts[0]['l0']:.3g}..{pts[-1]['l0']:.3g}: {better} is better")


def write_ablation_report(rows: list[dict], comparisons: list[dict], folder: Path, title: str) -> Path:
    lines = [f"# Ablation: {title}", "", "Is the gain from the JumpReLU activation, from the L0 penalty, or both?",
             "Each arm's frontier is interpolated in log L0; values at equal L0 (held-out tokens).", "",
             "## Answers", ""]
    lines += [_verdict(c) for c in comparisons]
    if not any(_finite(r.get("delta_ce")) for r in rows):
        lines.append("- delta LM loss: not measured (see each SAE's report.json, `delta_lm.skipped`)")
    lines += ["", "## At equal L0", ""]
    for c in comparisons:
        if not c["points"]:
            continue
        lines += [f"**{c['question']}: {c['metric']}**", "", f"| L0 | {c['a']} | {c['b']} | difference | relative |",
                  "|---|---|---|---|---|"]
        for p in c["points"]:
            relative = "" if p["relative"] is None else f"{100 * p['relative']:+.1f}%"
            lines.append(f"| {p['l0']:.3g} | {p[c['a']]:.4g} | {p[c['b']]:.4g} | {p['difference']:+.4g} | {relative} |")
        lines.append("")
    lines += ["## Every SAE", "", (folder / "table.md").read_text()]
    path = folder / "ablation.md"
    path.write_text("\n".join(lines) + "\n")
    (folder / "ablation.json").write_text(
        json.dumps(json_safe({"rows": rows, "comparisons": comparisons}), indent=1, allow_nan=False) + "\n")
    return path


def frontier_figure(reports: list[dict], path: Path, title: str) -> Path:
    """FVU and delta LM loss against L0 side by side, every arm on each."""
    import matplotlib.pyplot as plt

    from .plots import _colour, _style, log_l0_axis
    metrics = [(m, n) for m, n in METRICS if any(_finite(r["reconstruction"].get(m, r["delta_lm"].get(m)))
                                                 for r in reports)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.6), squeeze=False)
    labels = sorted({r["label"] for r in reports})
    for ax, (metric, name) in zip(axes[0], metrics):
        for i, label in enumerate(labels):
            pts = sorted((r["reconstruction"]["l0"], r["reconstruction"].get(metric, r["delta_lm"].get(metric)))
                         for r in reports if r["label"] == label)
            pts = [p for p in pts if _finite(p[1]) and p[0] > 0]
            if pts:
                ax.plot(*zip(*pts), _style(label), color=_colour(label, i), label=label)
        log_l0_axis(ax)
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="lower-left is better", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_ablation(cfg: AblationConfig) -> dict:
    if cfg.train:
        train_sweep(cfg)
    outcome = run_evaluation(cfg.eval)
    folder = outcome["folder"]
    title = f"layer {cfg.layer} {cfg.sublayer}, {Path(cfg.cache).name}"
    comparisons = compare_at_equal_l0(outcome["rows"])
    outcome["ablation_report"] = write_ablation_report(outcome["rows"], comparisons, folder, title)
    outcome["ablation_plot"] = frontier_figure(outcome["reports"], folder / "ablation_frontier.png", title)
    outcome["comparisons"] = comparisons
    return outcome


register_configs()


@hydra.main(config_path="../conf", config_name="ablation", version_base=None)
def main(cfg: DictConfig) -> None:
    config: AblationConfig = OmegaConf.to_object(cfg)
    with clear_errors():
        outcome = run_ablation(config)
    print_summary(outcome)
    print("\n".join(_verdict(c) for c in outcome["comparisons"]))
    print(f"ablation: {outcome['ablation_report']} and {outcome['ablation_plot']}")


if __name__ == "__main__":
    main()

"""The quality benchmark's report: per cache and budget a table of every SAE (the mean over its seeds
where it was trained at several), the best of each trainer at equal L0 (each arm's frontier
interpolated in log L0), and a frontier plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from evaluate.equal_l0 import MAX_L0_GAP, comparison_l0s, covers, finite as _finite, frontier

from .seed_mean import merged_runs, run_seed

# metric -> (title, higher is better)
METRICS = {"fvu": ("FVU", False), "recovered": ("true features recovered", True),
           "mmcs": ("MMCS", True), "alive": ("alive latents", True), "delta_ce": ("delta LM loss", False),
           "kl_spliced": ("KL to the clean LM", False)}
# The compared metrics, in the report's order; a metric with a row field "<metric>_se" (the LM ones: over
# held-out sequences; any, over seeds) is read with its standard error, interpolated like the metric on
# the same arm.
COMPARED = ("fvu", "recovered", "delta_ce", "kl_spliced", "alive")
# LM metrics scored per held-out sequence (quality/bench.py keeps the lists): two SAEs scored on the same
# sequences are compared by the standard error of their per-sequence differences (paired), which the
# sequences' own difficulty, common to both, does not inflate.
PER_SEQUENCE = {"delta_ce": "delta_ce_per_sequence", "kl_spliced": "kl_per_sequence"}
# Fractions whose differences read as percentage points: a relative difference on a recovery near 0
# (the papers' lr on basic: SAELens's BatchTopK recovers 0.4%) reads +3958%.
IN_POINTS = {"recovered"}
TRAINERS = ("ours", "saelens")


def seed_runs(path) -> dict:
    """{(cache name, budget name, seed): run} of a results.json (out/'s, or the kept docs/quality/results.json)."""
    return {(r["cache"]["name"], r["budget"]["name"], run_seed(r)): r for r in json.loads(Path(path).read_text())["runs"]}


def results_runs(path) -> dict:
    """{(cache name, budget name): run} of a results.json, a run of several seeds as their means
    (quality/seed_mean.py)."""
    runs = merged_runs(json.loads(Path(path).read_text())["runs"])
    return {(r["cache"]["name"], r["budget"]["name"]): r for r in runs}


def best_at_equal_l0(rows: list[dict], metric: str) -> dict:
    """Per trainer, the best arm's interpolated metric at the L0 of every SAE that all trainers reach
    (each arm only where its sweep covers that L0, MAX_L0_GAP)."""
    higher = METRICS[metric][1]
    arms = {t: sorted({r["arm"] for r in rows if r["trainer"] == t and _finite(r.get(metric))}) for t in TRAINERS}
    curves = {t: {a: frontier(rows, "arm", a, metric) for a in arms[t]} for t in TRAINERS}
    se_curves = {a: _se_curve(rows, a, metric) for t in TRAINERS for a in arms[t]}
    per_sequence = {a: _per_sequence_curve(rows, a, metric) for t in TRAINERS for a in arms[t]}
    spans = {t: [(c[0][0], c[0][-1]) for c in curves[t].values() if len(c[0])] for t in TRAINERS}
    if not all(spans[t] for t in TRAINERS):
        return {"metric": metric, "points": [], "note": "a trainer has no SAE with this metric"}
    lo = max(min(s[0] for s in spans[t]) for t in TRAINERS)
    hi = min(max(s[1] for s in spans[t]) for t in TRAINERS)
    if lo > hi:
        return {"metric": metric, "points": [], "note": "the trainers' L0 ranges do not overlap"}
    points = []
    for x in comparison_l0s([c[0] for t in TRAINERS for c in curves[t].values()], lo, hi):
        point = {"l0": float(math.exp(x))}
        for t in TRAINERS:
            cands = [(float(np.interp(x, cx, cy)), a) for a, (cx, cy) in curves[t].items() if covers(cx, x)]
            if cands:               # none where this L0 falls in a gap of every arm of a trainer
                point[t], point[f"{t}_arm"] = (max if higher else min)(cands)
                se = se_curves[point[f"{t}_arm"]]
                if se is not None:
                    point[f"{t}_se"] = float(np.interp(x, *se))
        if not all(t in point for t in TRAINERS):
            continue
        curves_here = [per_sequence[point[f"{t}_arm"]] for t in TRAINERS]
        if all(c is not None for c in curves_here) and curves_here[0][1].shape[1] == curves_here[1][1].shape[1] > 1:
            ours_seq, theirs_seq = (_per_sequence_at(c, x) for c in curves_here)
            point["paired_se"] = float(np.std(ours_seq - theirs_seq, ddof=1) / math.sqrt(len(ours_seq)))
        point["ours_better"] = point["ours"] > point["saelens"] if higher else point["ours"] < point["saelens"]
        points.append(point)
    return {"metric": metric, "points": points}


def _se_curve(rows: list[dict], arm: str, metric: str):
    """(log L0, standard error of `metric`) of the arm, read like the metric's frontier; None where a row
    of the arm has the metric but not its standard error (results kept from before they were recorded)."""
    if not all(_finite(r.get(f"{metric}_se")) for r in rows if r["arm"] == arm and _finite(r.get(metric))):
        return None
    return frontier(rows, "arm", arm, f"{metric}_se")


def _per_sequence_curve(rows: list[dict], arm: str, metric: str):
    """(log L0 of the arm's SAEs, their per-sequence values of `metric` [SAEs, sequences]), the SAEs
    the metric's frontier holds, by L0; None where the metric has none or a row lacks them."""
    key = PER_SEQUENCE.get(metric)
    own = [r for r in rows if r["arm"] == arm and _finite(r.get(metric)) and _finite(r.get("l0")) and r["l0"] > 0]
    if key is None or not own or not all(r.get(key) for r in own):
        return None
    own.sort(key=lambda r: r["l0"])
    return np.log([r["l0"] for r in own]), np.array([r[key] for r in own], dtype=float)


def _per_sequence_at(curve, x: float) -> np.ndarray:
    """A per-sequence curve read at log-L0 x, each sequence interpolated as the metric's frontier is (so
    that their mean is the metric's interpolated value): each SAE's weight in np.interp at x."""
    log_l0, values = curve
    weights = np.array([np.interp(x, log_l0, unit) for unit in np.eye(len(log_l0))])
    return weights @ values


def _within_noise(p: dict) -> bool:
    """Whether the two trainers' values at a point differ by less than two standard errors of the
    difference: of the per-sequence differences where both were scored per sequence (paired), else
    the two errors taken as independent (each SAE on the same sequences, so this errs wide)."""
    if "paired_se" in p:
        return abs(p["ours"] - p["saelens"]) < 2 * p["paired_se"]
    if "ours_se" not in p or "saelens_se" not in p:
        return False
    return abs(p["ours"] - p["saelens"]) < 2 * math.hypot(p["ours_se"], p["saelens_se"])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def frontier_plot(rows: list[dict], title: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [m for m in COMPARED if any(_finite(r.get(m)) for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 4.2), squeeze=False)
    arms = sorted({(r["trainer"], r["arm"]) for r in rows})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(arms) > len(colours):                 # the default cycle repeats after 10: no two arms alike
        colours = list(plt.get_cmap("tab20").colors)
    for ax, metric in zip(axes[0], metrics):
        for i, (trainer, arm) in enumerate(arms):
            mine = sorted((r for r in rows if r["arm"] == arm and _finite(r.get(metric))), key=lambda r: r["l0"])
            if mine:
                se = [r.get(f"{metric}_se") for r in mine]
                ax.errorbar([r["l0"] for r in mine], [r[metric] for r in mine],
                            yerr=se if all(map(_finite, se)) else None, fmt="-o" if trainer == "ours" else "--s",
                            color=colours[i % len(colours)], label=arm, markersize=4, capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(METRICS[metric][0] + (" (higher is better)" if METRICS[metric][1] else " (lower is better)"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title + "   (solid: ours, dashed: SAELens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _summary_cell(cmp: dict, metric: str) -> str:
    """"k of n (+x%)": at how many of the compared L0s our best arm is at least as good (the target's
    terms: at most SAELens's FVU, at least its recovery), and the median relative difference, or for
    IN_POINTS the median difference in percentage points (positive: ours better; a median, as a delta
    LM loss near 0 makes single ratios explode)."""
    pts = cmp["points"]
    if not pts:
        return "n/a"
    sign = 1.0 if METRICS[metric][1] else -1.0
    if metric in IN_POINTS:
        median = f" ({100 * float(np.median([sign * (p['ours'] - p['saelens']) for p in pts])):+.1f} pts)"
    else:
        rel = [sign * (p["ours"] - p["saelens"]) / abs(p["saelens"]) for p in pts if p["saelens"] != 0]
        median = f" ({100 * float(np.median(rel)):+.0f}%)" if rel else ""
    behind = [p for p in pts if not _at_least_as_good(p)]
    noise = f"; {sum(map(_within_noise, behind))} of the other {len(behind)} within 2 s.e." \
        if behind and any("ours_se" in p for p in pts) else ""
    return f"{len(pts) - len(behind)} of {len(pts)}{median}{noise}"


def _with_se(p: dict, trainer: str) -> str:
    se = p.get(f"{trainer}_se")
    return f"{p[trainer]:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def _at_least_as_good(p: dict) -> bool:
    """The target's terms at a point: ours better or level."""
    return p["ours_better"] or p["ours"] == p["saelens"]


def _verdict(p: dict) -> str:
    if _at_least_as_good(p):
        return "yes" if p["ours_better"] else "level"
    return "no (within 2 s.e.)" if _within_noise(p) else "no"


def write_report(results: dict, out: Path) -> Path:
    """report.md and the frontier plots of `results` (one run per cache, budget and seed; the runs of
    several seeds compared by their means); each merged run's comparisons are added to it."""
    metrics = COMPARED
    runs = merged_runs(results["runs"])
    for run in runs:
        run["comparisons"] = [best_at_equal_l0(run["rows"], m) for m in metrics
                              if any(_finite(r.get(m)) for r in run["rows"])]
    lines = ["# SAE quality: ours against SAELens, same data", "",
             "Every SAE of a cache and budget saw the same rows in the same order; scores on the same held-out",
             "sequences. Best of each trainer at equal L0: at the L0 of each SAE that both trainers reach, each",
             "arm's frontier interpolated in log L0 (an arm only between SAEs of its sweep at most",
             f"{MAX_L0_GAP:g}x apart in L0), the best arm of each trainer.", "",
             "At how many of those L0s our best arm is at least as good as SAELens's best (median relative",
             "difference, of true features recovered in percentage points, positive: ours better; where values",
             "have standard errors, how many of the L0s where ours is behind differ by less than two of them:",
             "on LM caches over the held-out sequences (of the two SAEs' per-sequence differences where both",
             "were scored per sequence), and over the seeds where a cache's arms were trained",
             "at several, each SAE then the mean of its seeds):",
             "",
             "| cache / budget | " + " | ".join(METRICS[m][0] for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for run in runs:
        by_metric = {c["metric"]: c for c in run["comparisons"]}
        seeds = f" ({len(run['seeds'])} seeds)" if len(run["seeds"]) > 1 else ""
        lines.append(f"| {run['cache']['name']} / {run['budget']['name']}{seeds} | "
                     + " | ".join(_summary_cell(by_metric[m], m) if m in by_metric else "" for m in metrics) + " |")
    lines.append("")
    columns = ["arm", "level", "seeds", "l0", "fvu", "fvu_se", "recovered", "recovered_se", "mmcs", "alive", "alive_se",
               "dead_fraction", "delta_ce", "delta_ce_se", "kl_spliced", "kl_spliced_se", "ms_per_step"]
    for run in runs:
        cache, budget, rows = run["cache"], run["budget"], run["rows"]
        seeds = f", seeds {', '.join(map(str, run['seeds']))}" if len(run["seeds"]) > 1 else ""
        title = f"{cache['name']} / {budget['name']} ({budget['tokens']:.3g} tokens, lr {budget['lr']:g}{seeds})"
        plot = frontier_plot(rows, title, out / f"frontier_{cache['name']}_{budget['name']}.png")
        lines += [f"## {title}", "", f"![frontier]({plot.name})", ""]
        for cmp in run["comparisons"]:
            metric = cmp["metric"]
            lines.append(f"**{METRICS[metric][0]}** at equal L0:" + (f" {cmp.get('note', 'no L0 that both trainers reach')}" if not cmp["points"] else ""))
            if cmp["points"]:
                lines += ["", "| L0 | ours (best arm) | SAELens (best arm) | ours better |", "|---|---|---|---|"]
                lines += [f"| {p['l0']:.3g} | {_with_se(p, 'ours')} ({p['ours_arm']}) | {_with_se(p, 'saelens')} "
                          f"({p['saelens_arm']}) | {_verdict(p)} |" for p in cmp["points"]]
            lines.append("")
        shown = [c for c in columns if any(r.get(c) is not None for r in rows)]
        lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
        for r in sorted(rows, key=lambda r: (r["trainer"], r["arm"], r["l0"])):
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

"""`python -m quality.recipe_report RUN_DIR... --baseline ARM --out FILE.md`: one-change recipe arms
against a baseline arm at equal L0, from the arm results that quality runs keep
(`<out>/runs/<cache>/<budget>/seed_<s>/arms/*.json`; a budget's folder gives each SAE's mean over
its seeds, quality/seed_mean.py), merged over several runs of the same cache and budget
(e.g. `make quality` and the recipe study, whose caches are generated from the same seeds), or
from a results.json (`RESULTS.json#cache/budget`: the kept docs/quality/results.json, say);
`DIR:arm,arm` takes only some arms of a run (where two runs have an arm of the same name), and
`DIR:arm=name` one under another name (the same arm of two runs, e.g. a default before and after).

Each arm's frontier is interpolated in log L0 (quality/report.py) at L0 values both it and the
baseline reach; the table gives the mean relative difference there, per metric, and the arm's
levels in full. True features recovered, a fraction that is 0 over whole L0 ranges (superposition
above L0 10), is given as the mean difference in percentage points instead. Writes the Markdown
file and a frontier plot beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .report import COMPARED, METRICS, frontier_plot, results_runs
from .seed_mean import mean_rows


def load_arms(run_dirs: list) -> list[dict]:
    """Every arm kept under each run dir; `DIR:arm,arm` takes only those arms from DIR, and
    `DIR:arm=name` takes one under another name (the same arm of two runs: a default before and after)."""
    rows, seen = [], set()
    for entry in run_dirs:
        source, _, only = str(entry).partition(":")
        names = {arm: new or arm for arm, _, new in (a.partition("=") for a in only.split(","))} if only else None
        found = _results_json_arms(source) if "#" in source else _folder_arms(Path(source))
        missing = set(names) - set(found) if names else set()
        if missing:
            raise FileNotFoundError(f"no results for arms {sorted(missing)} in {source}")
        for arm, arm_rows in found.items():
            if names is not None and arm not in names:
                continue
            name = names[arm] if names else arm
            if name in seen:
                raise ValueError(f"arm {name!r} is in more than one of {run_dirs}: keep one, or name one "
                                 f"DIR:{arm}=<other name>")
            seen.add(name)
            rows += [{**r, "arm": name} for r in arm_rows]
    if not rows:
        raise FileNotFoundError(f"no arm results under {[str(d) for d in run_dirs]} (…/arms/*.json)")
    return rows


def _folder_arms(folder: Path) -> dict:
    """{arm: rows} of a run folder: its arms/*.json, or for a budget's folder (seed_*/arms/*.json) each
    arm's SAEs as the mean over the seeds it has."""
    dirs = [folder / "arms"] if (folder / "arms").is_dir() else sorted(folder.glob("seed_*/arms"))
    per_seed: dict[str, list] = {}
    for d in dirs:
        for p in sorted(d.glob("*.json")):
            per_seed.setdefault(p.stem, []).append(json.loads(p.read_text())["rows"])
    return {arm: seeds[0] if len(seeds) == 1 else mean_rows(seeds) for arm, seeds in per_seed.items()}


def _results_json_arms(source: str) -> dict:
    """`RESULTS.json#cache/budget`: {arm: rows} of that run of a results.json (e.g. the kept
    docs/quality/results.json, whose arms have no folders here)."""
    path, _, run = source.partition("#")
    cache, _, budget = run.partition("/")
    found = results_runs(path).get((cache, budget))
    if found is None:
        raise FileNotFoundError(f"{path} has no run {cache}/{budget}")
    out = {}
    for row in found["rows"]:
        out.setdefault(row["arm"], []).append(row)
    return out


def against_baseline(rows: list[dict], arm: str, baseline: str, metric: str) -> dict:
    """Mean relative difference ("better") and mean difference ("difference") of `arm` from `baseline`
    at L0 values both reach (the ablation's equal-L0 comparison, evaluate/ablation.py), signed so that
    positive means the arm is better; None where the L0 ranges do not overlap, "better" None also
    where the baseline is not positive."""
    from evaluate.ablation import compare_at_equal_l0
    labelled = [{**r, "architecture": r["arm"]} for r in rows]
    (entry,) = compare_at_equal_l0(labelled, questions=[(arm, baseline, "")],
                                   metrics=[(metric, METRICS[metric][0])])
    pts = entry["points"]
    if not pts:
        return {"better": None, "difference": None, "range": None}
    sign = 1.0 if METRICS[metric][1] else -1.0
    rel = [p["relative"] for p in pts]
    return {"better": None if any(r is None for r in rel) else sign * float(np.mean(rel)),
            "difference": sign * float(np.mean([p["difference"] for p in pts])),
            "range": (pts[0]["l0"], pts[-1]["l0"])}


def write_recipe_report(rows: list[dict], baseline: str, out: Path, title: str) -> Path:
    metrics = [m for m in COMPARED if any(r.get(m) is not None for r in rows)]
    arms = sorted({r["arm"] for r in rows})
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} is not among {arms}")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = frontier_plot(rows, title, out.with_suffix(".png"))
    lines = [f"# {title}", "", f"Each arm against `{baseline}` at equal L0 (log-L0 interpolation over the L0 range both",
             "reach; mean relative difference, true features recovered in percentage points; **positive: the arm",
             "is better**, whichever way the metric points).", "",
             f"![frontier]({plot.name})", "",
             "| arm | L0 range | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for arm in arms:
        if arm == baseline:
            continue
        cells, span = [], None
        for m in metrics:
            c = against_baseline(rows, arm, baseline, m)
            span = span or c["range"]
            if m == "recovered":
                cells.append("n/a" if c["difference"] is None else f"{100 * c['difference']:+.1f} pts")
            else:
                cells.append("n/a" if c["better"] is None else f"{100 * c['better']:+.0f}%")
        rng = f"{span[0]:.2g}-{span[1]:.2g}" if span else "no overlap"
        lines.append(f"| {arm} | {rng} | " + " | ".join(cells) + " |")
    lines += ["", "Every SAE:", "", "| arm | level | L0 | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
              "|---|---|---|" + "---|" * len(metrics)]
    for r in sorted(rows, key=lambda r: (r["arm"] != baseline, r["arm"], r["level"])):
        vals = " | ".join("" if r.get(m) is None else f"{r[m]:.4g}" for m in metrics)
        lines.append(f"| {r['arm']} | {r['level']:g} | {r['l0']:.3g} | {vals} |")
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="<quality out>/runs/<cache>/<budget>[/seed_<s>] folders or "
                   "RESULTS.json#<cache>/<budget>; DIR:arm,arm takes only those arms from DIR, "
                   "DIR:arm=name one under another name")
    p.add_argument("--baseline", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="Recipes, one change at a time")
    a = p.parse_args(argv)
    print(f"[recipes] wrote {write_recipe_report(load_arms(a.run_dirs), a.baseline, a.out, a.title)}")


if __name__ == "__main__":
    main()

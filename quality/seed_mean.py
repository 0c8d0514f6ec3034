"""Several seeds of one cache and budget as one run: each SAE (arm and level) scored as the mean over
the seeds it was trained at, with the standard error of that mean beside the compared metrics
(`<metric>_se`), which the report reads as it reads the LM metrics' errors over held-out sequences."""
from __future__ import annotations

import math

import numpy as np

from evaluate.equal_l0 import finite

# The scores averaged over seeds; those the report compares (report.COMPARED) carry a standard error.
AVERAGED = ("l0", "fvu", "recovered", "mmcs", "alive", "dead_fraction", "dense_fraction", "delta_ce",
            "fraction_recovered", "fraction_recovered_mean", "kl_spliced", "ms_per_step")
WITH_SE = ("fvu", "recovered", "alive", "delta_ce", "kl_spliced")


def run_seed(run: dict) -> int:
    """A results.json run's seed (runs written before the benchmark had seeds: its one seed, 0)."""
    return int(run.get("seed", 0))


def merged_runs(runs: list[dict]) -> list[dict]:
    """The runs of each (cache, budget), in the order first seen, as one run with `seeds` and mean rows; a
    run of one seed keeps its rows as they are."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["cache"]["name"], run["budget"]["name"]), []).append(run)
    merged = []
    for group in groups.values():
        group = sorted(group, key=run_seed)
        seeds = [run_seed(r) for r in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{group[0]['cache']['name']}/{group[0]['budget']['name']}: seed listed twice ({seeds})")
        rows = group[0]["rows"] if len(group) == 1 else mean_rows([r["rows"] for r in group])
        merged.append({"cache": group[0]["cache"], "budget": group[0]["budget"], "seeds": seeds, "rows": rows})
    return merged


def mean_rows(per_seed: list[list[dict]]) -> list[dict]:
    """One row per SAE (arm, level) of any seed, in the order first seen: the mean of its seeds' rows."""
    by_sae: dict[tuple, list[dict]] = {}
    for rows in per_seed:
        for r in rows:
            by_sae.setdefault((r["arm"], r["level"]), []).append(r)
    return [_mean(rows) for rows in by_sae.values()]


def _mean(rows: list[dict]) -> dict:
    out = {k: rows[0][k] for k in ("name", "arm", "trainer", "level") if k in rows[0]}
    out["seeds"] = len(rows)
    for key in AVERAGED:
        values = [r.get(key) for r in rows]
        if not all(finite(v) for v in values):
            continue
        out[key] = float(np.mean(values))
        if key in WITH_SE:
            se = standard_error(values, [r.get(f"{key}_se") for r in rows])
            if se is not None:
                out[f"{key}_se"] = se
    return out


def standard_error(values: list[float], own: list) -> float | None:
    """The standard error of the mean of `values` over seeds: their spread (n - 1 degrees of freedom)
    over sqrt(n). Where every seed's value has an error of its own (the LM metrics, over held-out
    sequences that every seed shares, so that part does not shrink with more seeds), its mean square
    is added. None for one seed without an error of its own."""
    n = len(values)
    spread = float(np.var(values, ddof=1)) / n if n > 1 else None
    shared = float(np.mean(np.square(own))) if all(finite(e) for e in own) else None
    if spread is None and shared is None:
        return None
    return math.sqrt((spread or 0.0) + (shared or 0.0))

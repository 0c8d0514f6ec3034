"""Comparing SAEs at equal L0 (the ablation, the quality benchmark, the recipe studies): an arm's
frontier is its metric against log L0 over its sweep, read by linear interpolation only where the
sweep covers that L0."""
from __future__ import annotations

import math

import numpy as np

# An arm is read only between its SAEs at most this factor apart in L0: across a wider gap of its
# sweep, a straight line in log L0 says little about the SAE a level there would give.
MAX_L0_GAP = 4.0


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def frontier(rows: list[dict], key: str, label: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(log L0, metric) of the rows whose `key` is `label`, by L0."""
    pts = sorted((r["l0"], r[metric]) for r in rows if r[key] == label and finite(r.get(metric))
                 and finite(r.get("l0")) and r["l0"] > 0)
    return np.log([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def covers(log_l0: np.ndarray, x: float, max_gap: float = MAX_L0_GAP) -> bool:
    """Whether log-L0 x is one of the sweep's SAEs or lies between two of them at most max_gap apart."""
    if not len(log_l0) or x < log_l0[0] - 1e-9 or x > log_l0[-1] + 1e-9:
        return False
    if np.min(np.abs(log_l0 - x)) <= 1e-9:
        return True
    j = int(np.searchsorted(log_l0, x))
    return log_l0[j] - log_l0[j - 1] <= math.log(max_gap) + 1e-12


def comparison_l0s(log_l0s: list[np.ndarray], lo: float, hi: float) -> np.ndarray:
    """The log L0s to compare at: every SAE of the sweeps compared, inside [lo, hi] (each then is
    measured for one arm and read off the others' frontiers where they cover it)."""
    xs = np.unique(np.concatenate([np.asarray(c, dtype=float) for c in log_l0s] + [np.zeros(0)]))
    return xs[(xs >= lo - 1e-9) & (xs <= hi + 1e-9)]

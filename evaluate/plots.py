"""PNG plots of evaluation reports: sparsity/fidelity frontiers, firing-frequency histograms,
reconstruction error by position, training curves."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402

# Fixed colours per architecture label, so every plot of a sweep agrees.
COLOURS = {"jumprelu+l0": "tab:red", "jumprelu+l1": "tab:orange", "relu+l1": "tab:blue",
           "topk": "tab:green", "gated+l1": "tab:purple"}


MARKERS = {"jumprelu+l0": "o-", "jumprelu+l1": "s--", "relu+l1": "^-", "topk": "D-", "gated+l1": "v-"}


def _colour(label: str, i: int) -> str:
    return COLOURS.get(label, f"C{(i + 5) % 10}")


def _style(label: str) -> str:
    return MARKERS.get(label, "o-")


def log_l0_axis(ax) -> None:
    """Log-scaled L0 axis labelled 1, 2, 5, 10, 20, ... rather than in powers of ten."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def frontier(reports: list[dict], y: str, path: Path, title: str) -> Optional[Path]:
    """y against L0, one line per architecture label (points sorted by L0). None if no point has y."""
    series = defaultdict(list)
    for r in reports:
        value = r["reconstruction"].get(y, r["delta_lm"].get(y))
        if _finite(value) and r["reconstruction"]["l0"] > 0:
            series[r["label"]].append((r["reconstruction"]["l0"], value, r["sparsity"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], _style(label), color=_colour(label, i), label=label)
    log_l0_axis(ax)
    ax.set_xlabel("L0 (mean active latents per token, held-out)")
    ylabels = {"fvu": "fraction of variance unexplained", "delta_ce": "delta LM loss (nats / token)"}
    ax.set_ylabel(ylabels.get(y, y))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="lower-left is better", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _log_frequency_histogram(ax, freq: np.ndarray, bins_per_decade: int, lo: float):
    alive = freq[freq > 0]
    edges = np.linspace(lo, 0, max(1, int(round(-lo * bins_per_decade))) + 1)
    ax.hist(np.log10(np.clip(alive, 10 ** lo, 1)), bins=edges, color="tab:blue")
    dead = int((freq == 0).sum())
    ax.text(0.02, 0.95, f"dead: {dead}/{len(freq)}", transform=ax.transAxes, va="top", fontsize=8)


def firing_histograms(reports: list[dict], path: Path, bins_per_decade: int = 10) -> Path:
    """log10 firing frequency of each latent, one panel per SAE (the dense threshold marked)."""
    n = len(reports)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    lo = min([-1.0] + [math.floor(math.log10(1.0 / max(r["reconstruction"]["n_tokens"], 1))) for r in reports])
    for ax, r in zip(axes.flat, reports):
        _log_frequency_histogram(ax, np.asarray(r["firing_frequency"], dtype=float), bins_per_decade, lo)
        ax.axvline(math.log10(r["dense_threshold"]), color="tab:red", ls="--", lw=1)
        ax.set_title(f"{r['label']} {r['sparsity']}\nL0 {r['reconstruction']['l0']:.3g}", fontsize=8)
        ax.set_xlabel("log10 firing frequency", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("latents", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_by_position(reports: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    seen = set()
    for i, r in enumerate(reports):
        y = np.array([np.nan if v is None else v for v in r["fvu_by_position"]], dtype=float)
        # Few SAEs: one legend entry each; many: one per architecture (the colours).
        label = f"{r['label']} {r['sparsity']}" if len(reports) <= 12 else (
            None if r["label"] in seen else r["label"])
        seen.add(r["label"])
        ax.plot(np.arange(len(y)), y, color=_colour(r["label"], i), alpha=0.8, lw=1, label=label)
    ax.set_xlabel("position in context (0 = BOS, excluded)")
    ax.set_ylabel("squared error / mean variance per token")
    ax.set_title("reconstruction error by position (held-out; its mean over tokens is the FVU)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: the log up to it is still good
    return rows


TRAINING_KEYS = ("loss", "fvu", "l0", "dead", "dense", "sparsity_coeff")


def training_curves(runs: list[tuple[dict, Path]], path: Path,
                    keys: tuple[str, ...] = TRAINING_KEYS) -> Optional[Path]:
    """Logged training metrics against step, one panel per metric, one line per run."""
    logs = [(r, read_metrics(f)) for r, f in runs if f is not None]
    logs = [(r, rows) for r, rows in logs if rows]
    if not logs:
        return None
    present = [k for k in keys if any(any(_finite(row.get(k)) for row in rows) for _, rows in logs)]
    if not present:
        return None
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        seen = set()
        for i, (r, rows) in enumerate(logs):
            pts = [(row.get("step", j), row[key]) for j, row in enumerate(rows) if _finite(row.get(key))]
            label = f"{r['label']} {r['sparsity']}" if len(logs) <= 12 else (
                None if r["label"] in seen else r["label"])
            seen.add(r["label"])
            if pts:
                ax.plot(*zip(*pts), color=_colour(r["label"], i), lw=1, alpha=0.8, label=label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("loss", "mse", "fvu") and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(reports: list[dict], metrics_files: list[Optional[Path]], folder: Path, title: str,
             bins_per_decade: int = 10) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(reports)), key=lambda i: (reports[i]["label"], -reports[i]["reconstruction"]["l0"]))
    reports = [reports[i] for i in order]
    metrics_files = [metrics_files[i] for i in order]
    out = [
        frontier(reports, "delta_ce", folder / "frontier_l0_delta_lm_loss.png", f"{title}: L0 vs delta LM loss"),
        frontier(reports, "fvu", folder / "frontier_l0_fvu.png", f"{title}: L0 vs FVU"),
        firing_histograms(reports, folder / "firing_frequency.png", bins_per_decade),
        error_by_position(reports, folder / "error_by_position.png"),
        training_curves(list(zip(reports, metrics_files)), folder / "training_curves.png"),
    ]
    return [p for p in out if p is not None]

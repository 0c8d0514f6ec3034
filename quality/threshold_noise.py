"""Part 1 of the threshold-gradient study (issue #12): the noise of the threshold-gradient estimate at
fixed parameters, per latent-frequency bucket, for pooled estimators and for wider bandwidths.

At one SAE's parameters, N consecutive training batches each give a per-latent estimate g_t of the
threshold gradient (from the kernel's per-latent sums, kernels/reference.py). The target is their mean
over all N batches at the default bandwidth (a large-batch estimate of the same quantity); the scale is
each latent's mean of g_t^2 for the batch-alone estimator (at a converged point the expected gradient is
near zero, so the scale, not the target, is the yardstick). For each estimator we report, per bucket of
latents by firing frequency, the mean over latents of
  bias^2 / scale       (the estimator's mean minus the target, squared)
  variance / scale     (across steps)
  zero fraction        (steps on which the estimate is exactly zero)
and, once per bucket, target^2 / scale: how much of the batch estimate's square is signal.
Estimators: the batch alone (none); the mean of the last K batches (window K); an exponential moving
average with time constant K and bias correction (ema K); the batch alone at a wider bandwidth. At
fixed parameters pooling cannot be stale, so this measures the variance pooling removes and the bias a
wider bandwidth adds; what staleness costs when the parameters move is part 2 (training).
"""
from __future__ import annotations

import torch

import kernels

from train.sae.threshold_pool import ThresholdGradPool


def batch_sums(sae, batches, lam: float, bandwidth: float):
    """Per batch, the per-latent (near_df, near_coef) of the L0 loss at the SAE's parameters."""
    out = []
    for x in batches:
        seen = {}

        def record(near_df, near_coef):
            seen["s"] = (near_df.detach().clone(), near_coef.detach().clone())
            return near_df, near_coef
        params = [p.detach().clone().requires_grad_(True) for p in
                  (sae.W_enc, sae.b_enc, sae.threshold, sae.W_dec, sae.b_dec)]
        res = kernels.jumprelu_sae(x, *params, bandwidth=bandwidth, sparsity_coeff=lam, backend="reference",
                                   threshold_pool=record)
        res.loss.backward()
        out.append(seen["s"])
    return out


def estimates(sums, theta, bandwidth, mode="none", steps=1):
    """The threshold-gradient estimate of each step [N, W] under a pooling mode."""
    pool = ThresholdGradPool(mode, steps, len(theta)) if mode != "none" else None
    rows = []
    for near_df, near_coef in sums:
        if pool is not None:
            near_df, near_coef = pool(near_df, near_coef)
        rows.append(kernels.reference.threshold_grad(theta, near_df, near_coef, bandwidth))
    return torch.stack(rows).double()


BUCKETS = ((0, 1e-3), (1e-3, 1e-2), (1e-2, 1e-1), (1e-1, 1.01))


def noise_table(sae, batches, lam: float, bandwidth: float, windows=(2, 4, 8, 16), ema=(8,),
                wide=(3e-3, 1e-2, 3e-2), skip: int = 16) -> dict:
    """{estimator: {bucket: {bias2, variance, zero_fraction, latents}}}; the first `skip` steps are
    left out of every estimator's statistics, so that windows are full."""
    theta = sae.threshold.detach()
    x_all = torch.cat(batches)
    with torch.no_grad():
        freq = ((x_all @ sae.W_enc + sae.b_enc) > theta).double().mean(0)
    sums = batch_sums(sae, batches, lam, bandwidth)
    alone = estimates(sums, theta, bandwidth)
    target, scale = alone.mean(0), alone.pow(2).mean(0)
    cases = {"none": alone}
    for k in windows:
        cases[f"window {k}"] = estimates(sums, theta, bandwidth, "window", k)
    for k in ema:
        cases[f"ema {k}"] = estimates(sums, theta, bandwidth, "ema", k)
    for eps in wide:
        cases[f"bandwidth {eps:g}"] = estimates(batch_sums(sae, batches, lam, eps), theta, eps)
    table, signal = {}, {}
    for lo, hi in BUCKETS:
        sel = (freq >= lo) & (freq < hi) & (scale > 0)
        if bool(sel.any()):
            name = f"{lo:g}-{min(hi, 1):g}"
            signal[name] = {"signal": float((target[sel] ** 2 / scale[sel]).mean()), "latents": int(sel.sum())}
    for name, est in cases.items():
        est = est[skip:]
        row = {}
        for lo, hi in BUCKETS:
            sel = (freq >= lo) & (freq < hi) & (scale > 0)
            if not bool(sel.any()):
                continue
            e, t, s = est[:, sel], target[sel], scale[sel]
            row[f"{lo:g}-{min(hi, 1):g}"] = {
                "bias2": float(((e.mean(0) - t) ** 2 / s).mean()),
                "variance": float((e.var(0) / s).mean()),
                "zero_fraction": float((e == 0).double().mean()),
            }
        table[name] = row
    return {"table": table, "signal": signal, "n_batches": len(batches), "batch_size": int(batches[0].shape[0]),
            "bandwidth": bandwidth, "lambda": lam, "skip": skip}


def format_table(result: dict) -> str:
    buckets = sorted({b for row in result["table"].values() for b in row}, key=lambda s: float(s.split("-")[0]))
    head = "| estimator | " + " | ".join(f"{b} (bias² / var / zero)" for b in buckets) + " |"
    lines = [head, "|" + "---|" * (len(buckets) + 1)]
    for name, row in result["table"].items():
        cells = []
        for b in buckets:
            c = row.get(b)
            cells.append("" if c is None else f"{c['bias2']:.3g} / {c['variance']:.3g} / {c['zero_fraction']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Per bucket: latents, and target^2 / scale (the share of the batch estimate's square that is "
                 "signal): " + "; ".join(f"{b}: {v['latents']} latents, {v['signal']:.3g}"
                                         for b, v in result["signal"].items()))
    return "\n".join(lines)


__all__ = ["noise_table", "format_table", "estimates", "batch_sums"]

"""Threshold gradients with memory: the kernel-density estimate behind JumpReLU's threshold gradient,
pooled across steps (`sae.threshold_grad_pool`: none | window | ema, `sae.threshold_grad_pool_steps`: K).

The straight-through threshold gradient of latent i is -(theta_i near_df_i + near_coef_i) / eps, where
the two per-latent sums run over the batch's entries within eps/2 of the threshold (kernels/reference.py):
near_df_i = sum K df (the reconstruction term) and near_coef_i = sum K coef (the sparsity term). With a
bandwidth of 0.001 few tokens of a batch fall in the window, so for rare latents both sums are zero most
steps, with rare spikes. Pooling replaces each sum by its mean over the last K steps (`window`), or by an
exponential moving average with time constant K (beta = 1 - 1/K) and Adam-style bias correction (`ema`),
so the estimate's sample grows K-fold without widening the bandwidth.

What is pooled, and why: the two sums, not the gradient. theta_i multiplies the pooled near_df_i at
the current threshold (the factor is exact; only the density needs samples), and the sparsity term keeps
the current lambda's weight only through its samples (near_coef already holds lambda's coefficient of
each earlier step: during lambda's warm-up the pooled sparsity term lags by about K/2 steps). Samples
from earlier steps were measured at earlier thresholds and weights: they are stale by the distance the
threshold moved, which is the bias the study (quality/threshold_pool_study.py) measures against the
variance it removes.

Cost per latent: window, 2K floats of state and 2K adds per step; ema, 2 floats and 4 flops. The state
is a buffer of the SAE, so it is in every checkpoint and a resumed run is bit-identical. `window` with
K = 1 is the identity (the sum of one sample divided by one), so it trains bit-identically to `none`.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "window", "ema")


class ThresholdGradPool(nn.Module):
    def __init__(self, mode: str, steps: int, d_sae: int):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"threshold_grad_pool={mode!r}: choose one of {', '.join(MODES)}")
        if steps < 1:
            raise ValueError(f"threshold_grad_pool_steps must be at least 1, got {steps}")
        self.mode, self.steps = mode, int(steps)
        rows = self.steps if mode == "window" else 1
        self.register_buffer("near_df", torch.zeros(rows, d_sae))
        self.register_buffer("near_coef", torch.zeros(rows, d_sae))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))   # steps pooled so far

    @torch.no_grad()
    def __call__(self, near_df: torch.Tensor, near_coef: torch.Tensor):
        if self.mode == "none":
            return near_df, near_coef
        n = int(self.seen)
        self.seen += 1
        if self.mode == "window":
            slot = n % self.steps
            self.near_df[slot] = near_df.to(self.near_df.dtype)
            self.near_coef[slot] = near_coef.to(self.near_coef.dtype)
            filled = min(n + 1, self.steps)
            if filled == 1:
                return self.near_df[slot].to(near_df.dtype), self.near_coef[slot].to(near_coef.dtype)
            # the last `filled` samples, in a fixed order (oldest first): deterministic sums
            order = [(slot - filled + 1 + j) % self.steps for j in range(filled)]
            return (self.near_df[order].sum(0).div(filled).to(near_df.dtype),
                    self.near_coef[order].sum(0).div(filled).to(near_coef.dtype))
        beta = 1.0 - 1.0 / self.steps
        self.near_df.mul_(beta).add_(near_df.to(self.near_df.dtype), alpha=1 - beta)
        self.near_coef.mul_(beta).add_(near_coef.to(self.near_coef.dtype), alpha=1 - beta)
        correction = 1.0 - beta ** (n + 1)
        return (self.near_df[0].div(correction).to(near_df.dtype),
                self.near_coef[0].div(correction).to(near_coef.dtype))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, steps={self.steps}"

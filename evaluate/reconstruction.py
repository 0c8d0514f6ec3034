"""Reconstruction metrics of one SAE on held-out activations, accumulated batch by batch.

Everything is in raw activation units and excludes BOS rows (their norms are huge and no SAE is
trained on them). FVU is the squared error over the total variance about the per-dimension mean,
so a constant predictor of the mean scores 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch


@dataclass
class ReconstructionMetrics:
    n_tokens: int
    mse: float                      # mean over tokens of ||x - x_hat||^2
    mse_normalised: float           # mse / mean ||x||^2 (the trainer's normalised space)
    fvu: float
    l0: float                       # mean number of active latents per token
    dead_fraction: float            # latents that never fire on the held-out tokens
    dense_fraction: float           # latents that fire on more than dense_threshold of them
    dense_threshold: float
    firing_frequency: List[float]   # per latent
    mse_by_position: List[Optional[float]]   # per context position (None where only BOS)
    # Mean squared error at each position over the mean variance per token of all positions, so that
    # positions compare on one scale (and their token-weighted mean is the FVU); a per-position
    # variance would need many sequences to be stable.
    fvu_by_position: List[Optional[float]]

    def summary(self) -> Dict[str, float]:
        """The scalar metrics (what a table row shows)."""
        return {k: getattr(self, k) for k in
                ("n_tokens", "mse", "mse_normalised", "fvu", "l0", "dead_fraction", "dense_fraction")}


class ReconstructionAccumulator:
    """Feed it [n_seq, T, d] activations with a [n_seq, T] keep-mask; read `result()` at the end."""

    def __init__(self, d_sae: int, context_length: int, dense_threshold: float = 0.1):
        self.d_sae, self.T, self.dense_threshold = d_sae, context_length, dense_threshold
        f64 = dict(dtype=torch.float64)
        self.n = 0
        self.sq_err = torch.zeros((), **f64)
        self.sq_norm = torch.zeros((), **f64)
        self.sum_x: Optional[torch.Tensor] = None
        self.active = torch.zeros(d_sae, **f64)
        self.n_pos = torch.zeros(context_length, **f64)
        self.sq_err_pos = torch.zeros(context_length, **f64)

    @torch.no_grad()
    def update(self, sae: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> None:
        flat = x.float().reshape(-1, x.shape[-1])
        f = sae.encode(flat)
        self.update_encoded(x, f, sae.decode(f), keep)

    @torch.no_grad()
    def update_encoded(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, keep: torch.Tensor) -> None:
        """x [n_seq, T, d] with its codes f and reconstructions x_hat ([n_seq * T, ...]), computed once
        by the caller and shared with other accumulators. Reductions run where x lives (CPU or GPU) in
        float64; the running sums stay on the CPU."""
        n_seq, T, d = x.shape
        if T != self.T:
            raise ValueError(f"expected sequences of {self.T} positions, got {T}")
        flat = x.float().reshape(-1, d)
        keep_flat = keep.reshape(-1).to(x.device)
        keep64 = keep_flat.double()
        err = (flat - x_hat).double().pow(2).sum(-1) * keep64
        sq_norm = flat.double().pow(2).sum(-1) * keep64
        xs = flat.double() * keep64[:, None]
        if self.sum_x is None:
            self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.n += int(keep_flat.sum())
        self.sq_err += err.sum().cpu()
        self.sq_norm += sq_norm.sum().cpu()
        self.sum_x += xs.sum(0).cpu()
        self.active += ((f != 0) & keep_flat[:, None]).sum(0, dtype=torch.float64).cpu()
        self.n_pos += keep64.view(n_seq, T).sum(0).cpu()
        self.sq_err_pos += err.view(n_seq, T).sum(0).cpu()

    def result(self) -> ReconstructionMetrics:
        if self.n == 0:
            raise ValueError("no held-out non-BOS tokens to evaluate on")
        n = self.n
        total_var = self.sq_norm - self.sum_x.pow(2).sum() / n
        var_per_token = total_var / n
        freq = self.active / n
        mse_pos: List[Optional[float]] = []
        fvu_pos: List[Optional[float]] = []
        for t in range(self.T):
            if self.n_pos[t] == 0:
                mse_pos.append(None)
                fvu_pos.append(None)
                continue
            mse_t = self.sq_err_pos[t] / self.n_pos[t]
            mse_pos.append(float(mse_t))
            fvu_pos.append(float(mse_t / var_per_token) if var_per_token > 0 else None)
        return ReconstructionMetrics(
            n_tokens=n,
            mse=float(self.sq_err / n),
            mse_normalised=float(self.sq_err / self.sq_norm),
            fvu=float(self.sq_err / total_var),
            l0=float(self.active.sum() / n),
            dead_fraction=float((freq == 0).double().mean()),
            dense_fraction=float((freq > self.dense_threshold).double().mean()),
            dense_threshold=self.dense_threshold,
            firing_frequency=freq.tolist(),
            mse_by_position=mse_pos,
            fvu_by_position=fvu_pos,
        )

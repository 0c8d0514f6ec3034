"""Per-latent histograms of activations over [0, max), built in one pass without knowing the max.

Latent i has `bins` equal bins over [0, 2^e_i); when a value reaches 2^e_i, e_i grows and adjacent
bins merge (pairwise per doubling), so counts stay exact and the largest value always lies in the
upper half of the range: at least bins/2 bins span the data.
"""
from __future__ import annotations

import torch

NO_DATA = -(2 ** 31)     # exponent of a latent that has not fired yet


class StreamingHistogram:
    def __init__(self, n_latents: int, bins: int = 64, device: torch.device | str = "cpu"):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 2, got {bins}")
        self.bins = int(bins)
        self.counts = torch.zeros((n_latents, self.bins), dtype=torch.int64, device=device)
        self.exponent = torch.full((n_latents,), NO_DATA, dtype=torch.int64, device=device)

    def add(self, latent: torch.Tensor, values: torch.Tensor) -> None:
        """Count values [C] (> 0; anything <= 0 falls in bin 0) of latents [C]."""
        if latent.numel() == 0:
            return
        values = values.float()
        vmax = torch.zeros(len(self.exponent), device=values.device).scatter_reduce(
            0, latent, values, reduce="amax", include_self=True)
        need = torch.where(vmax > 0, torch.ceil(torch.log2(vmax.clamp_min(1e-38))).long(), self.exponent)
        # a value exactly 2^e belongs to the last bin of [0, 2^e) (clamped below), so ceil suffices
        grow = torch.nonzero(need > self.exponent).flatten()
        if len(grow):
            fresh = self.exponent[grow] == NO_DATA
            shift = (need[grow] - self.exponent[grow]).clamp(max=62)
            shift = torch.where(fresh, torch.zeros_like(shift), shift)
            merged = torch.zeros((len(grow), self.bins), dtype=torch.int64, device=self.counts.device)
            target = torch.arange(self.bins, device=self.counts.device)[None, :] >> shift[:, None]
            merged.scatter_add_(1, target, self.counts[grow])
            self.counts[grow] = merged
            self.exponent[grow] = need[grow]
        scale = torch.ldexp(torch.ones_like(values), -self.exponent[latent].clamp(min=-126, max=127).int())
        b = (values * scale * self.bins).long().clamp(0, self.bins - 1)
        self.counts.view(-1).index_add_(0, latent * self.bins + b, torch.ones_like(b))

    def ranges(self) -> torch.Tensor:
        """[n] float: the upper end 2^e_i of each latent's range (0 where it never fired)."""
        e = self.exponent
        return torch.where(e == NO_DATA, torch.zeros_like(e, dtype=torch.float64),
                           torch.pow(2.0, e.clamp(min=-1000).double()))

    def state_dict(self) -> dict:
        return {"counts": self.counts, "exponent": self.exponent}

    def load_state_dict(self, state: dict) -> None:
        self.counts.copy_(state["counts"])
        self.exponent.copy_(state["exponent"])

"""For each latent, the k entries with the largest keys seen so far, kept while streaming.

Entries arrive as sparse lists (latent, key, payload). A caller first asks `threshold` and drops the
entries that cannot get in (after the first few batches almost all of them), then merges the rest:
only the latents they touch are re-sorted. With random keys this is reservoir sampling (a uniform
sample of each latent's entries); with activations as keys, the top-k.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch


class PerLatentTopK:
    def __init__(self, n_latents: int, k: int, payload: Dict[str, Tuple[tuple, torch.dtype]],
                 device: torch.device | str = "cpu"):
        """payload: name -> (per-entry shape, dtype) of what travels with each key."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.n, self.k = int(n_latents), int(k)
        self.keys = torch.full((self.n, self.k), float("-inf"), device=device)   # rows sorted descending
        self.payload = {name: torch.zeros((self.n, self.k, *shape), dtype=dtype, device=device)
                        for name, (shape, dtype) in payload.items()}

    @property
    def threshold(self) -> torch.Tensor:
        """[n]: the key an entry must beat to get in (-inf while a latent has free slots)."""
        return self.keys[:, -1]

    def merge(self, latent: torch.Tensor, key: torch.Tensor, payload: Dict[str, torch.Tensor]) -> None:
        """Add entries (latent [C] int64, key [C], payload name -> [C, ...]); ties keep the older entry."""
        if latent.numel() == 0:
            return
        touched, group_new = torch.unique(latent, return_inverse=True)
        U, k = len(touched), self.k
        old_keys = self.keys[touched]
        keys = torch.cat([old_keys.reshape(-1), key.to(self.keys.dtype)])
        group = torch.cat([torch.arange(U, device=latent.device).repeat_interleave(k), group_new])
        order = torch.argsort(keys, descending=True, stable=True)
        order = order[torch.argsort(group[order], stable=True)]
        g = group[order]
        counts = torch.bincount(g, minlength=U)
        rank = torch.arange(len(order), device=latent.device) - (torch.cumsum(counts, 0) - counts)[g]
        chosen = rank < k
        g, rank, order = g[chosen], rank[chosen], order[chosen]
        new_keys = torch.full((U, k), float("-inf"), device=self.keys.device)
        new_keys[g, rank] = keys[order]
        self.keys[touched] = new_keys
        for name, store in self.payload.items():
            values = torch.cat([store[touched].reshape(U * k, *store.shape[2:]), payload[name].to(store.dtype)])
            new = torch.zeros((U, k, *store.shape[2:]), dtype=store.dtype, device=store.device)
            new[g, rank] = values[order]
            store[touched] = new

    def state_dict(self) -> dict:
        return {"keys": self.keys, **{f"payload.{k}": v for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.keys.copy_(state["keys"])
        for name, store in self.payload.items():
            store.copy_(state[f"payload.{name}"])

"""For each latent, the k entries with the largest keys seen so far, kept while streaming.

Entries arrive as sparse lists (latent, key). A caller drops those that cannot beat `threshold`
(after the first batches almost all of them) and offers the rest: they are cut to the k best per
latent of the batch, their payloads (what travels with a key, e.g. a window of activations) are
taken, and they wait in a buffer. When the buffer holds about an eighth of the state, it is merged:
laid out as a [touched latents, k] block beside the kept entries and sorted row by row, so that a
merge costs about as much as the entries it brings. Thresholds only rise, so a stale one never
drops an entry that belongs. With random keys this is reservoir sampling (a uniform sample of each
latent's entries); with activations as keys, the top-k. The result does not depend on batching.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch


def best_per_latent(latent: torch.Tensor, key: torch.Tensor, k: int):
    """(order, touched, row, rank): indices of the k largest keys of each latent (ties: the earlier
    entry first), the sorted distinct latents, and each kept entry's row in `touched` and rank."""
    order = torch.sort(key, descending=True, stable=True).indices
    order = order[torch.sort(latent[order], stable=True).indices]
    touched, row, counts = torch.unique_consecutive(latent[order], return_inverse=True, return_counts=True)
    rank = torch.arange(len(order), device=latent.device) - (torch.cumsum(counts, 0) - counts)[row]
    best = rank < k
    return order[best], touched, row[best], rank[best]


class PerLatentTopK:
    def __init__(self, n_latents: int, k: int, payload: Dict[str, Tuple[tuple, torch.dtype]],
                 device: torch.device | str = "cpu"):
        """payload: name -> (per-entry shape, dtype) of what travels with each key."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.n, self.k = int(n_latents), int(k)
        self._keys = torch.full((self.n, self.k), float("-inf"), device=device)   # rows sorted descending
        self._payload = {name: torch.zeros((self.n, self.k, *shape), dtype=dtype, device=device)
                         for name, (shape, dtype) in payload.items()}
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]] = []
        self._buffered = 0
        self.flush_at = max(1024, self.n * self.k // 8)

    @property
    def threshold(self) -> torch.Tensor:
        """[n]: a key that cannot get in (-inf while a latent has free slots); only ever rises."""
        return self._keys[:, -1]

    @property
    def keys(self) -> torch.Tensor:
        self.flush()
        return self._keys

    @property
    def payload(self) -> Dict[str, torch.Tensor]:
        self.flush()
        return self._payload

    def offer(self, latent: torch.Tensor, key: torch.Tensor,
              payload_of: Callable[[torch.Tensor], Dict[str, torch.Tensor]]) -> None:
        """Entries latent [C] int64, key [C]; payload_of(indices into the C entries) returns name ->
        [len(indices), ...] for the ones worth keeping. Ties keep the earlier entry."""
        if latent.numel() == 0:
            return
        if int(torch.bincount(latent).max()) <= self.k:        # the usual case once warm: nothing to cut
            order = torch.arange(len(latent), device=latent.device)
        else:
            order = torch.sort(best_per_latent(latent, key, self.k)[0]).values   # arrival order: ties favour earlier
        self._buffer.append((latent[order], key[order], payload_of(order)))
        self._buffered += len(order)
        if self._buffered >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        latent = torch.cat([b[0] for b in self._buffer])
        key = torch.cat([b[1] for b in self._buffer])
        values = {name: torch.cat([b[2][name] for b in self._buffer]) for name in self._payload}
        self._buffer, self._buffered = [], 0
        k = self.k
        order, touched, row, rank = best_per_latent(latent, key, k)
        U = len(touched)
        fresh = torch.full((U, k), float("-inf"), device=latent.device)
        fresh[row, rank] = key[order].to(fresh.dtype)
        candidate = torch.full((U, k), -1, dtype=torch.long, device=latent.device)
        candidate[row, rank] = order
        # kept entries first, so that the stable sort lets them win ties
        merged = torch.sort(torch.cat([self._keys[touched], fresh], dim=1), dim=1, descending=True, stable=True)
        slot = merged.indices[:, :k]                          # < k: a kept entry; >= k: a new one
        self._keys[touched] = merged.values[:, :k]
        new_r, new_s = torch.nonzero(slot >= k, as_tuple=True)
        came_from = candidate[new_r, slot[new_r, new_s] - k]
        for name, store in self._payload.items():
            rows = store[touched]
            index = slot.clamp(max=k - 1).reshape(U, k, *([1] * (rows.dim() - 2))).expand_as(rows)
            kept = rows.gather(1, index)
            kept[new_r, new_s] = values[name][came_from].to(store.dtype)
            store[touched] = kept

    def state_dict(self) -> dict:
        self.flush()
        return {"keys": self._keys, **{f"payload.{k}": v for k, v in self._payload.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._buffer, self._buffered = [], 0
        self._keys.copy_(state["keys"])
        for name, store in self._payload.items():
            store.copy_(state[f"payload.{name}"])

"""One pass over held-out tokens: what the browser shows about every latent, without keeping the
[tokens, d_sae] codes (16k latents x 1M tokens would be 64 GB).

Per latent, streamed batch by batch:
- firing count, sum and max of its activations;
- the `top_contexts` held-out sequences where it peaks highest, each with the position of its peak
  and its activations in a window around it (per sequence, so that one sequence never fills the list);
- a uniform random sample of its firings (reservoir sampling by random keys) with their windows,
  from which the quantile bands draw examples;
- an exact activation histogram (`histogram.StreamingHistogram`).
Positions the caller masks out (BOS) count as not firing. Deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .histogram import StreamingHistogram
from .topk import PerLatentTopK

WINDOW_DTYPE = torch.float16         # a window's activations are for shading; the keys stay float32
FLOAT16_MAX = 65504.0


@dataclass
class CollectedFeatures:
    n_tokens: int                    # tokens counted (unmasked)
    count: torch.Tensor              # [W] int64: tokens on which each latent fired (f != 0)
    total: torch.Tensor              # [W] float64: sum of its activations
    max: torch.Tensor                # [W] float32
    top_key: torch.Tensor            # [W, k] sequence peaks, descending (-inf: empty slot)
    top_seq: torch.Tensor            # [W, k] index of the sequence in the order fed
    top_pos: torch.Tensor            # [W, k] position of the peak
    top_window: torch.Tensor         # [W, k, before + 1 + after] activations around it
    sample_key: torch.Tensor         # [W, s] random keys (-inf: empty slot)
    sample_act: torch.Tensor         # [W, s]
    sample_seq: torch.Tensor
    sample_pos: torch.Tensor
    sample_window: torch.Tensor
    hist_counts: torch.Tensor        # [W, bins] over [0, hist_range)
    hist_range: torch.Tensor         # [W]
    before: int
    after: int

    @property
    def frequency(self) -> torch.Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation over the tokens where the latent fires (0 for dead latents)."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1).double(), torch.zeros_like(self.total))


class FeatureCollector:
    def __init__(self, d_sae: int, top_contexts: int = 20, sample_size: int = 64, before: int = 16,
                 after: int = 6, histogram_bins: int = 64, seed: int = 0, device: torch.device | str = "cpu"):
        self.W, self.before, self.after = int(d_sae), int(before), int(after)
        self.device = torch.device(device)
        win = (self.before + 1 + self.after,)
        self.offsets = torch.arange(-self.before, self.after + 1, device=self.device)
        self.n_tokens = 0
        self.count = torch.zeros(self.W, dtype=torch.int64, device=self.device)
        self.total = torch.zeros(self.W, dtype=torch.float64, device=self.device)
        self.max = torch.zeros(self.W, device=self.device)
        self.top = PerLatentTopK(self.W, top_contexts, {"seq": ((), torch.int64), "pos": ((), torch.int64),
                                                         "window": (win, WINDOW_DTYPE)}, self.device)
        self.sample = PerLatentTopK(self.W, sample_size, {"act": ((), torch.float32), "seq": ((), torch.int64),
                                                          "pos": ((), torch.int64), "window": (win, WINDOW_DTYPE)},
                                    self.device)
        self.hist = StreamingHistogram(self.W, histogram_bins, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    def _windows(self, f: torch.Tensor, keep: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor,
                 latent: torch.Tensor) -> torch.Tensor:
        """[C, window] activations of latent[c] in sequence seq[c] (of the batch) around pos[c]; 0 at
        masked positions and outside the sequence."""
        T = f.shape[1]
        at = pos[:, None] + self.offsets[None, :]
        inside = (at >= 0) & (at < T)
        at = at.clamp(0, T - 1)
        vals = f[seq[:, None], at, latent[:, None]] * (inside & keep[seq[:, None], at])
        return vals.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(WINDOW_DTYPE)

    @torch.no_grad()
    def update(self, f: torch.Tensor, keep: torch.Tensor, seq_index: torch.Tensor) -> None:
        """f [b, T, W] codes of b sequences, keep [b, T] bool (False: not counted, e.g. BOS),
        seq_index [b] int64: each sequence's index in the order fed (what top_seq refers to).

        Everything past the one scan for nonzero codes works on the firings alone (L0 per token,
        not d_sae): dense passes over [b, T, W] would cost as much as the encoder."""
        b, T, W = f.shape
        keep = keep.to(f.device)
        self.n_tokens += int(keep.sum())
        seq_index = seq_index.to(self.device)
        s, t, lat = torch.nonzero(f, as_tuple=True)
        counted = torch.nonzero(keep[s, t]).flatten()
        s, t, lat = s[counted], t[counted], lat[counted]
        acts = f[s, t, lat]
        self.count += torch.bincount(lat, minlength=W)
        self.total.index_add_(0, lat, acts.double())
        self.hist.add(lat, acts)

        # each sequence's peak per latent (the first position of it, as argmax would give)
        pair = s * W + lat
        peak = torch.full((b * W,), float("-inf"), device=f.device).scatter_reduce(
            0, pair, acts.float(), reduce="amax", include_self=True)
        at_peak = torch.nonzero(acts == peak[pair]).flatten()
        peak_pos = torch.full((b * W,), T, dtype=torch.int64, device=f.device).scatter_reduce(
            0, pair[at_peak], t[at_peak], reduce="amin", include_self=True)
        peak, peak_pos = peak.view(b, W), peak_pos.view(b, W)
        self.max = torch.maximum(self.max, peak.amax(0).clamp_min(0))
        ps, plat = torch.nonzero((peak > 0) & (peak > self.top.threshold[None, :]), as_tuple=True)
        ppos = peak_pos[ps, plat]
        self.top.offer(plat, peak[ps, plat], lambda j: {"seq": seq_index[ps[j]], "pos": ppos[j],
                                                          "window": self._windows(f, keep, ps[j], ppos[j], plat[j])})

        key = torch.rand(len(lat), generator=self.generator, device=self.device)
        enters = torch.nonzero(key > self.sample.threshold[lat]).flatten()
        s, t, lat, acts, key = s[enters], t[enters], lat[enters], acts[enters], key[enters]
        self.sample.offer(lat, key, lambda j: {"act": acts[j], "seq": seq_index[s[j]], "pos": t[j],
                                               "window": self._windows(f, keep, s[j], t[j], lat[j])})

    def result(self) -> CollectedFeatures:
        cpu = lambda t: t.cpu()
        return CollectedFeatures(
            n_tokens=self.n_tokens, count=cpu(self.count), total=cpu(self.total), max=cpu(self.max),
            top_key=cpu(self.top.keys), top_seq=cpu(self.top.payload["seq"]), top_pos=cpu(self.top.payload["pos"]),
            top_window=cpu(self.top.payload["window"]), sample_key=cpu(self.sample.keys),
            sample_act=cpu(self.sample.payload["act"]), sample_seq=cpu(self.sample.payload["seq"]),
            sample_pos=cpu(self.sample.payload["pos"]), sample_window=cpu(self.sample.payload["window"]),
            hist_counts=cpu(self.hist.counts), hist_range=cpu(self.hist.ranges()), before=self.before,
            after=self.after)

    def state_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "count": self.count, "total": self.total, "max": self.max,
                "top": self.top.state_dict(), "sample": self.sample.state_dict(), "hist": self.hist.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.n_tokens = int(state["n_tokens"])
        for name in ("count", "total", "max"):
            getattr(self, name).copy_(state[name])
        self.top.load_state_dict(state["top"])
        self.sample.load_state_dict(state["sample"])
        self.hist.load_state_dict(state["hist"])
        self.generator.set_state(state["generator"])

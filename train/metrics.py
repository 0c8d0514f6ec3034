"""Training metrics: dead/dense latent bookkeeping and the JSONL + TensorBoard log of a run folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class LatentStats:
    """Dead latents: no activation in the last `window` tokens (in the tokens seen so far, early on).
    Dense latents: active on more than `dense_fraction` of the tokens of the current and previous window."""

    def __init__(self, d_sae: int, window: int, dense_fraction: float, device):
        self.window, self.dense_fraction = int(window), float(dense_fraction)
        self.tokens = 0                                                   # tokens observed
        self.last_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.seen = 0
        self.prev_counts = torch.zeros_like(self.counts)
        self.prev_seen = 0

    def update(self, firings: torch.Tensor, n_tokens: int) -> None:
        """firings [d_sae]: on how many of the batch's n_tokens tokens each latent fired."""
        self.tokens += n_tokens
        self.last_fired.masked_fill_(firings > 0, self.tokens)
        self.counts += firings
        self.seen += n_tokens
        if self.seen >= self.window:
            self.prev_counts, self.prev_seen = self.counts, self.seen
            self.counts, self.seen = torch.zeros_like(self.counts), 0

    def dead(self) -> int:
        return int(((self.tokens - self.last_fired) >= min(self.window, max(self.tokens, 1))).sum())

    def dead_mask(self) -> torch.Tensor:
        """Latents with no activation in the last `window` tokens (none before `window` tokens are seen)."""
        if self.tokens < self.window:
            return torch.zeros_like(self.last_fired, dtype=torch.bool)
        return (self.tokens - self.last_fired) >= self.window

    def revive(self, idx: torch.Tensor) -> None:
        """Latents `idx` count as having fired now (re-initialised ones: dead again only after a window)."""
        self.last_fired[idx] = self.tokens

    def dense(self) -> int:
        seen = self.seen + self.prev_seen
        if seen == 0:
            return 0
        return int(((self.counts + self.prev_counts).double() / seen > self.dense_fraction).sum())

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "last_fired": self.last_fired.cpu(), "counts": self.counts.cpu(),
                "seen": self.seen, "prev_counts": self.prev_counts.cpu(), "prev_seen": self.prev_seen}

    def load_state_dict(self, s: dict) -> None:
        dev = self.last_fired.device
        self.tokens, self.seen, self.prev_seen = s["tokens"], s["seen"], s["prev_seen"]
        self.last_fired, self.counts = s["last_fired"].to(dev), s["counts"].to(dev)
        self.prev_counts = s["prev_counts"].to(dev)


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) and TensorBoard event files in a run folder."""

    def __init__(self, folder: Path, tensorboard: bool, resume_step: int | None = None):
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():   # drop lines logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=resume_step)

    def write(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

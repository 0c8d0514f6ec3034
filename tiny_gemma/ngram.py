"""Unigram and bigram baselines of the embedded model's corpus, on the same predictions as the model.

Counts are taken over the packed training sequences: each pair (s[t], s[t+1]) of a sequence s, so
the first prediction of a sequence is conditioned on BOS, as the model's is. They ship with the
checkpoint (`ngram_counts.npz`, delta-coded sparse bigram counts; the unigram counts of the
predicted tokens are their column sums), so the tests can score the baselines without the corpus.

- unigram: add-one smoothed frequency of the predicted token.
- bigram: interpolated Kneser-Ney with discount 0.75, its continuation distribution mixed with a
  uniform one so that no token gets probability zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DISCOUNT = 0.75
FILENAME = "ngram_counts.npz"


@dataclass
class BigramCounts:
    vocab_size: int
    keys: np.ndarray      # sorted int64 prev * vocab_size + next
    counts: np.ndarray    # int64, one per key

    @classmethod
    def from_sequences(cls, sequences: np.ndarray, vocab_size: int) -> "BigramCounts":
        seqs = np.asarray(sequences, dtype=np.int64)
        keys = (seqs[:, :-1] * vocab_size + seqs[:, 1:]).reshape(-1)
        keys, counts = np.unique(keys, return_counts=True)
        return cls(vocab_size, keys, counts.astype(np.int64))

    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILENAME
        np.savez_compressed(path, vocab_size=np.int64(self.vocab_size),
                            key_deltas=np.diff(self.keys, prepend=0).astype(np.uint32),
                            counts=self.counts.astype(np.uint32))
        return path

    @classmethod
    def load(cls, folder: Path) -> "BigramCounts":
        with np.load(Path(folder) / FILENAME) as z:
            return cls(int(z["vocab_size"]), np.cumsum(z["key_deltas"].astype(np.int64)),
                       z["counts"].astype(np.int64))


def _pairs(sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seqs = np.asarray(sequences, dtype=np.int64)
    return seqs[:, :-1].reshape(-1), seqs[:, 1:].reshape(-1)


def unigram_cross_entropy(counts: BigramCounts, sequences: np.ndarray) -> float:
    V = counts.vocab_size
    unigram = np.bincount(counts.keys % V, weights=counts.counts, minlength=V)
    p = (unigram + 1.0) / (unigram.sum() + V)
    _, nxt = _pairs(sequences)
    return float(-np.log(p[nxt]).mean())


def bigram_cross_entropy(counts: BigramCounts, sequences: np.ndarray, discount: float = DISCOUNT) -> float:
    V = counts.vocab_size
    prev_of, next_of = counts.keys // V, counts.keys % V
    c_prev = np.bincount(prev_of, weights=counts.counts, minlength=V)          # c(v .)
    types_after = np.bincount(prev_of, minlength=V).astype(np.float64)         # N1+(v .)
    types_before = np.bincount(next_of, minlength=V).astype(np.float64)        # N1+(. w)
    continuation = (types_before + 1.0) / (types_before.sum() + V)
    prev, nxt = _pairs(sequences)
    idx = np.searchsorted(counts.keys, prev * V + nxt)
    idx = np.minimum(idx, len(counts.keys) - 1)
    c_pair = np.where(counts.keys[idx] == prev * V + nxt, counts.counts[idx], 0).astype(np.float64)
    seen = c_prev[prev] > 0
    denom = np.where(seen, c_prev[prev], 1.0)
    p = np.where(seen, np.maximum(c_pair - discount, 0.0) / denom
                 + discount * types_after[prev] / denom * continuation[nxt], continuation[nxt])
    return float(-np.log(p).mean())

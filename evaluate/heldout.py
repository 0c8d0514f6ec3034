"""The held-out sequences of a cache, read back as token and activation batches.

Which sequences are held out is the trainer's rule (`train.cache_reader.heldout_sequences`), so
evaluation sees exactly the sequences training never did. Held-out sequences are scattered over the
cache; from bare chunk files only their rows are read.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import zarr

from train.cache_reader import (ActivationArray, CacheError, complete_heldout_sequences,
                                open_activations, open_cache)


def open_site(cache_path: str, layer: int, sublayer: str) -> ActivationArray:
    """The site's activation array; clear errors when the cache lacks it or its `tokens` array."""
    group = open_cache(cache_path)
    if "tokens" not in group or not isinstance(group["tokens"], zarr.Array):
        raise CacheError(f"cache {cache_path!r} has no `tokens` array: delta LM loss and BOS masking "
                         "need the token ids (DESIGN.md, format version 1)")
    return open_activations(cache_path, layer, sublayer)


def select_heldout(source: ActivationArray, heldout: dict, max_tokens: Optional[int]) -> np.ndarray:
    seqs = complete_heldout_sequences(source, heldout)
    if len(seqs) == 0:
        raise CacheError(
            f"cache {source.cache_path!r} has no held-out sequence in a complete chunk (held-out rule "
            f"{heldout}, {source.n_sequences} sequences): harvest more tokens or raise the held-out fraction")
    if max_tokens is not None:
        seqs = seqs[:max(1, int(max_tokens) // source.context_length)]
    return seqs


def heldout_batches(source: ActivationArray, sequences: np.ndarray, batch_sequences: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [b, T] int64, activations [b, T, d] float32) for the given sequences, in order."""
    for lo in range(0, len(sequences), batch_sequences):
        seqs = np.asarray(sequences[lo:lo + batch_sequences], dtype=np.int64)
        tokens, acts = read_sequences(source, seqs)
        yield torch.from_numpy(tokens.astype(np.int64)), acts.float()


def read_sequences(source: ActivationArray, sequences: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Token ids [n, T] and stored activations [n, T, d] of the given sequences. Only their rows are
    read from bare chunk files (a held-out sequence is a small part of its chunk); compressed chunks
    are decoded whole, once per batch."""
    T, rows = source.context_length, source.chunk_rows
    out = np.empty((len(sequences) * T, source.width), dtype=source.numpy_dtype)
    tokens = np.empty(len(sequences) * T, dtype=np.int64)
    chunk_of = sequences * T // rows
    for c in np.unique(chunk_of):
        here = np.flatnonzero(chunk_of == c)
        slots = np.full(rows, -1, dtype=np.int64)
        for i in here:
            start = int(sequences[i]) * T - int(c) * rows
            slots[start:start + T] = np.arange(i * T, (i + 1) * T)
        source.read_chunk_into(int(c), out, slots)
        chunk_tokens = np.asarray(source.tokens[int(c) * rows:(int(c) + 1) * rows])
        keep = slots >= 0
        tokens[slots[keep]] = chunk_tokens[keep]
    return tokens.reshape(len(sequences), T), source.as_tensor(out).view(len(sequences), T, source.width)


def non_bos_mask(tokens: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """True at the positions statistics count: not BOS, and never position 0 (every sequence's BOS)."""
    keep = tokens != bos_token_id
    keep[:, 0] = False
    return keep

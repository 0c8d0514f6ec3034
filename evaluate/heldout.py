"""The held-out sequences of a cache, read back as token and activation batches.

Which sequences are held out is the trainer's rule (`train.cache_reader.heldout_sequences`), so
evaluation sees exactly the sequences training never did. Held-out sequences are scattered over the
cache; each needed chunk is read once.
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
    T, rows = source.context_length, source.chunk_rows
    cached_chunk, chunk_acts, chunk_tokens = -1, None, None
    tok_batch, act_batch = [], []
    for s in sequences:
        c = int(s) * T // rows
        if c != cached_chunk:
            chunk_acts = source.read_chunk(c)
            chunk_tokens = np.asarray(source.tokens[c * rows:(c + 1) * rows])
            cached_chunk = c
        start = int(s) * T - c * rows
        tok_batch.append(torch.from_numpy(chunk_tokens[start:start + T].astype(np.int64)))
        act_batch.append(chunk_acts[start:start + T].float())
        if len(tok_batch) == batch_sequences:
            yield torch.stack(tok_batch), torch.stack(act_batch)
            tok_batch, act_batch = [], []
    if tok_batch:
        yield torch.stack(tok_batch), torch.stack(act_batch)


def non_bos_mask(tokens: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """True at the positions statistics count: not BOS, and never position 0 (every sequence's BOS)."""
    keep = tokens != bos_token_id
    keep[:, 0] = False
    return keep

"""Packing documents into sequences of exactly `context_length` tokens, each starting with BOS.

Documents are tokenized without special tokens, joined with EOS, and cut into consecutive windows
of context_length - 1 tokens, each prefixed with BOS (a sequence may start mid-document, as in
Gemma Scope). BOS ids inside documents are dropped, so position 0 is the only BOS of a sequence.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator

import numpy as np


class CorpusTooSmall(ValueError):
    pass


def iter_sequences(documents: Iterable[str], tokenizer, context_length: int,
                   docs_per_batch: int = 64) -> Iterator[np.ndarray]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the tokenizer needs both a BOS and an EOS token")
    body = context_length - 1
    pending = np.empty(0, dtype=np.int32)
    docs = iter(documents)
    while batch := list(islice(docs, docs_per_batch)):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        pieces = [pending] + [np.asarray(x + [eos], dtype=np.int32) for x in ids]
        pending = np.concatenate(pieces)
        pending = pending[pending != bos]
        n = len(pending) // body
        for i in range(n):
            yield np.concatenate(([bos], pending[i * body:(i + 1) * body])).astype(np.int32)
        pending = pending[n * body:]

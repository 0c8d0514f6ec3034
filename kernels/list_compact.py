"""Forward, step 2: per-token lists of the kept latents, from the encoder's keep bitmask.

The encoder (jumprelu_encode.py) marks kept entries (active, or near the threshold) in a packed
bitmask, 32 latents per int32 word, instead of scanning in its GEMM epilogue. This kernel does the
scan: one program per token walks the token's words in order, BLOCK_W words (32 BLOCK_W latents)
at a time, and appends the kept latents to the token's list in increasing latent order:

    list_idx[b, k]   latent index of the k-th kept entry of token b (k < list_cnt[b])
    list_cnt[b]      number of kept entries of token b

Chunks without a kept entry are skipped. Each element has one writer; no atomics. The list has
room for every latent, so it cannot overflow (no host synchronisation to size it). Its slots past
list_cnt are never written here; the backward reuses the buffer for the per-latent token lists
(latent_transpose.py) once the per-token lists are dead.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def list_compact_kernel(
    keep_ptr, list_idx_ptr, list_cnt_ptr,
    W, n_words,
    BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_W * 32)
    keep_ptr += row * n_words
    list_idx_ptr += row * W
    n_kept = 0
    for w0 in range(0, n_words, BLOCK_W):
        word_ok = (w0 + lanes // 32) < n_words
        # Each word is loaded by its 32 lanes (the repeats hit L1): no reshape, no layout change.
        words = tl.load(keep_ptr + w0 + lanes // 32, mask=word_ok, other=0)
        if tl.sum((words != 0).to(tl.int32), axis=0) > 0:
            bit = (words >> (lanes % 32)) & 1
            dst = n_kept + tl.cumsum(bit, axis=0) - bit
            tl.store(list_idx_ptr + dst, w0 * 32 + lanes, mask=bit != 0)
            n_kept += tl.sum(bit, axis=0)
    tl.store(list_cnt_ptr + row, n_kept)


def compact_buffers(B, W, *, device="cpu", alloc=torch.empty):
    return dict(list_idx=alloc((B, W), dtype=torch.int32, device=device),
                list_cnt=alloc((B,), dtype=torch.int32, device=device))


def list_compact(enc, *, block_w, num_warps=4, alloc=torch.empty):
    """Adds list_idx [B, W] and list_cnt [B] (int32) to the encoder's outputs `enc`."""
    keep = enc["keep"]
    B, W = enc["pre"].shape
    out = compact_buffers(B, W, device=keep.device, alloc=alloc)
    list_compact_kernel[(B,)](keep, out["list_idx"], out["list_cnt"], W, keep.shape[1],
                              BLOCK_W=block_w, num_warps=num_warps)
    enc.update(out)
    return enc

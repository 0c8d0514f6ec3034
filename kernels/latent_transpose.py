"""Backward, step 2: per-latent token lists, deterministically, from the encoder's keep bitmask.

The per-latent reductions of the backward (dW_enc, dW_dec, db_enc, theta) must sum over tokens in
a fixed order without float atomics. This is a counting sort with no atomics at all: the encoder
wrote, per row block m and latent n, how many tokens kept n (col_cnt[m, n]), so the entries of
row block m start in latent n's list at

    col_start[m, n] = sum_{n' < n} total[n'] + sum_{m' < m} col_cnt[m', n]

(two small integer prefix sums, done on the device by torch: exact, no host synchronisation).
One program owns one row block and 32 BLOCK_W latents: it walks the block's tokens in increasing
order with one cursor per latent and writes each token that kept the latent at its cursor. So
every slot has one writer and every latent's list holds its tokens in increasing order:

    latent_src[col_ptr[n] : col_ptr[n] + col_tot[n]]   tokens that kept latent n

The list stores the token only: pre and df of entry (b, n) sit at [b, n] of their [B, W] buffers.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def latent_transpose_kernel(
    keep_ptr, col_start_ptr, latent_src_ptr,
    B, W, n_words,
    ROWS_PER_BLOCK: tl.constexpr, BLOCK_W: tl.constexpr,
):
    row_block = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_W * 32)
    latent = tl.program_id(1) * (BLOCK_W * 32) + lanes
    ok = latent < W
    word = latent // 32
    shift = lanes % 32
    cursor = tl.load(col_start_ptr + row_block.to(tl.int64) * W + latent, mask=ok, other=0)
    first = row_block * ROWS_PER_BLOCK
    for r in range(ROWS_PER_BLOCK):
        row = first + r + 0 * lanes
        # Each word is loaded by its 32 lanes (the repeats hit L1).
        words = tl.load(keep_ptr + row.to(tl.int64) * n_words + word, mask=ok & (row < B), other=0)
        bit = (words >> shift) & 1
        tl.store(latent_src_ptr + cursor, row, mask=bit != 0)
        cursor += bit.to(cursor.dtype)


def latent_transpose(enc, W, *, block_w, num_warps=4, out=None, alloc=torch.empty):
    """Per-latent token lists: latent n's tokens are latent_src[col_ptr[n] : col_ptr[n] +
    col_tot[n]], in increasing order. `out` (int32, >= B * W elements) receives them if given:
    the op passes the per-token list buffer, dead by then."""
    col_cnt = enc["col_cnt"]
    keep = enc["keep"]
    B = keep.shape[0]
    capacity = B * W
    index_dtype = torch.int32 if capacity < 2**31 else torch.int64
    col_tot = col_cnt.sum(0, dtype=torch.int64)
    col_ptr = torch.cumsum(col_tot, 0) - col_tot
    col_start = (col_ptr[None, :] + torch.cumsum(col_cnt, 0, dtype=torch.int64) - col_cnt).to(index_dtype)
    latent_src = out.view(-1) if out is not None else alloc((max(capacity, 1),), dtype=torch.int32,
                                                            device=keep.device)
    assert latent_src.dtype == torch.int32 and latent_src.numel() >= capacity
    grid = (col_cnt.shape[0], triton.cdiv(W, 32 * block_w))
    latent_transpose_kernel[grid](
        keep, col_start, latent_src, B, W, keep.shape[1],
        ROWS_PER_BLOCK=enc["block_m"], BLOCK_W=block_w, num_warps=num_warps,
    )
    return latent_src, col_ptr.to(index_dtype), col_tot.to(index_dtype)

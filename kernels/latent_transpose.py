"""Backward, step 2: turn the per-token lists into per-latent lists, deterministically.

The per-latent reductions of the backward (dW_enc, dW_dec, db_enc, theta) must sum over tokens in
a fixed order without float atomics. This is a counting sort with no atomics at all: the encoder
already wrote, per row block m and latent n, how many tokens kept n (col_cnt[m, n]) and, per entry,
the token's rank among them. So the position of entry (b, n) in latent n's list is

    col_start[m, n] + rank,   col_start[m, n] = sum_{n' < n} total[n'] + sum_{m' < m} col_cnt[m', n]

and tokens appear in increasing order in every latent's list. The two prefix sums are small
integer scans done on the device by torch (exact, no host synchronisation).
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def latent_transpose_kernel(
    list_idx_ptr, list_rank_ptr, list_cnt_ptr, col_start_ptr, latent_src_ptr,
    W, list_row_stride, seg_width,
    N_SEG: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_block = row // ROWS_PER_BLOCK
    es = tl.arange(0, BLOCK_E)
    for s in range(N_SEG):
        n = tl.load(list_cnt_ptr + row * N_SEG + s)
        base = row * list_row_stride + s * seg_width
        for e0 in range(0, n, BLOCK_E):
            e_ok = (e0 + es) < n
            idx = tl.load(list_idx_ptr + base + e0 + es, mask=e_ok, other=0)
            rank = tl.load(list_rank_ptr + base + e0 + es, mask=e_ok, other=0)
            start = tl.load(col_start_ptr + row_block * W + idx, mask=e_ok, other=0)
            src = base + e0 + es
            tl.store(latent_src_ptr + start + rank, src.to(latent_src_ptr.dtype.element_ty), mask=e_ok)


def latent_transpose(enc, W, *, block_e, num_warps=4, alloc=torch.empty):
    """Per-latent lists: latent n's entries are latent_src[col_ptr[n] : col_ptr[n] + col_tot[n]],
    each the flat slot index of the entry in the per-token list buffers."""
    col_cnt = enc["col_cnt"]
    list_idx = enc["list_idx"]
    capacity = list_idx.numel()
    index_dtype = torch.int32 if capacity < 2**31 else torch.int64
    col_tot = col_cnt.sum(0, dtype=torch.int64)
    col_ptr = torch.cumsum(col_tot, 0) - col_tot
    col_start = (col_ptr[None, :] + torch.cumsum(col_cnt, 0, dtype=torch.int64) - col_cnt).to(index_dtype)
    latent_src = alloc((max(capacity, 1),), dtype=index_dtype, device=list_idx.device)
    B = list_idx.shape[0]
    latent_transpose_kernel[(B,)](
        list_idx, enc["list_rank"], enc["list_cnt"], col_start, latent_src,
        W, list_idx.stride(0), enc["seg_width"],
        N_SEG=enc["n_seg"], ROWS_PER_BLOCK=enc["block_m"], BLOCK_E=block_e, num_warps=num_warps,
    )
    return latent_src, col_ptr.to(index_dtype), col_tot.to(index_dtype)

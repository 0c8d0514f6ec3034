"""Backward, step 1: df = g @ W_dec^T at the encoder's kept entries only.

df is needed at active latents (dpre = df there) and at inactive latents within bandwidth/2 of
the threshold (the JumpReLU pseudo-derivative of theta). Both are exactly the entries the encoder
kept, so this is a gather-dot per entry: df[b, i] = g[b, :] . W_dec[i, :]. One program per token
walks the token's list (list_compact.py); df is written at [b, i] of a [B, W] buffer, the layout
of the encoder's pre, and like pre only at kept entries.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def entry_grad_kernel(
    list_idx_ptr, list_cnt_ptr, g_ptr, w_dec_ptr, df_ptr,
    D, W,
    stride_gb, stride_gd, stride_wn, stride_wd,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    es = tl.arange(0, BLOCK_E)
    ds = tl.arange(0, BLOCK_D)
    n = tl.load(list_cnt_ptr + row)
    base = row * W
    for e0 in range(0, n, BLOCK_E):
        e_ok = (e0 + es) < n
        idx = tl.load(list_idx_ptr + base + e0 + es, mask=e_ok, other=0)
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + ds
            d_ok = d < D
            g = tl.load(g_ptr + row * stride_gb + d * stride_gd, mask=d_ok, other=0.0)
            w = tl.load(w_dec_ptr + idx.to(tl.int64)[:, None] * stride_wn + d[None, :] * stride_wd,
                        mask=e_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * g.to(tl.float32)[None, :], axis=1)
        tl.store(df_ptr + base + idx, acc, mask=e_ok)


def entry_grad_buffers(B, W, *, device="cpu", alloc=torch.empty):
    return alloc((B, W), dtype=torch.float32, device=device)


def entry_grad(enc, g, W_dec, *, block_e, block_d, num_warps=4, alloc=torch.empty):
    """df [B, W] (float32), written at the kept entries only, like enc['pre']."""
    B, D = g.shape
    W = enc["pre"].shape[1]
    df = entry_grad_buffers(B, W, device=g.device, alloc=alloc)
    entry_grad_kernel[(B,)](
        enc["list_idx"], enc["list_cnt"], g, W_dec, df,
        D, W,
        g.stride(0), g.stride(1), W_dec.stride(0), W_dec.stride(1),
        BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps,
    )
    return df


def entry_grad_reference(g, W_dec):
    return g.double() @ W_dec.double().T

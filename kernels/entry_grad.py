"""Backward, step 1: df = g @ W_dec^T at the encoder's kept entries only.

df is needed at active latents (dpre = df there) and at inactive latents within bandwidth/2 of
the threshold (the JumpReLU pseudo-derivative of theta). Both are exactly the entries the encoder
kept, so this is a gather-dot per entry: df[b, i] = g[b, :] . W_dec[i, :]. One program per token;
the result is written into the slot of the entry, beside its pre-activation.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def entry_grad_kernel(
    list_idx_ptr, list_cnt_ptr, g_ptr, w_dec_ptr, list_df_ptr,
    D, list_row_stride, seg_width,
    stride_gb, stride_gd, stride_wn, stride_wd,
    N_SEG: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    es = tl.arange(0, BLOCK_E)
    ds = tl.arange(0, BLOCK_D)
    for s in range(N_SEG):
        n = tl.load(list_cnt_ptr + row * N_SEG + s)
        base = row * list_row_stride + s * seg_width
        for e0 in range(0, n, BLOCK_E):
            e_ok = (e0 + es) < n
            idx = tl.load(list_idx_ptr + base + e0 + es, mask=e_ok, other=0).to(tl.int64)
            acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + ds
                d_ok = d < D
                g = tl.load(g_ptr + row * stride_gb + d * stride_gd, mask=d_ok, other=0.0)
                w = tl.load(w_dec_ptr + idx[:, None] * stride_wn + d[None, :] * stride_wd,
                            mask=e_ok[:, None] & d_ok[None, :], other=0.0)
                acc += tl.sum(w.to(tl.float32) * g.to(tl.float32)[None, :], axis=1)
            tl.store(list_df_ptr + base + e0 + es, acc, mask=e_ok)


def entry_grad(enc, g, W_dec, *, block_e, block_d, num_warps=4, out=None, alloc=torch.empty):
    """df at every kept entry, in the layout of enc['list_pre'] (written into `out` if given)."""
    B, D = g.shape
    list_df = out if out is not None else alloc(enc["list_pre"].shape, dtype=torch.float32,
                                                device=g.device)
    entry_grad_kernel[(B,)](
        enc["list_idx"], enc["list_cnt"], g, W_dec, list_df,
        D, enc["list_idx"].stride(0), enc["seg_width"],
        g.stride(0), g.stride(1), W_dec.stride(0), W_dec.stride(1),
        N_SEG=enc["n_seg"], BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps,
    )
    return list_df


def entry_grad_reference(g, W_dec):
    return g.double() @ W_dec.double().T

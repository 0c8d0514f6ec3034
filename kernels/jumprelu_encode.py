"""Encoder GEMM with the JumpReLU threshold fused into its epilogue.

pre = x @ W_enc + b_enc is computed tile by tile in registers (fp32 accumulation) and never written
to memory. The epilogue keeps only the entries the rest of the op needs: latents that are *active*
(pre > theta) or *near* the threshold (|pre - theta| < bandwidth/2, which the threshold's STE
gradient needs even when the latent is off). Those entries are appended, in increasing latent
order, to a per-(token, segment) list:

    list_idx[b, s, k]   latent index of the k-th kept entry of token b in column segment s
    list_pre[b, s, k]   its pre-activation (fp32); consumers recompute active/near from it
    list_rank[b, s, k]  rank of token b among the tokens of its row block that kept that latent
                        (lets the backward build a per-latent list with no atomics)
    list_cnt[b, s]      number of kept entries;  act_cnt[b, s]  number of active ones (L0)
    col_cnt[m, n]       number of kept entries of latent n among the tokens of row block m
    fire_cnt[m, n]      number of those tokens on which latent n is active (firings per latent)

One program owns one row block and one column segment and walks the segment's column tiles in
order, so every slot above has exactly one writer and the layout is the same bits on every run.
A segment's list has room for every latent of the segment, so it can never overflow; only the
first list_cnt slots are written.

Dense mode (DENSE_F): when most latents fire, lists lose to tensor cores. The epilogue then also
writes f = pre * H(pre - theta) densely in the operand dtype (for the dense decode and backward
GEMMs), and the lists keep only the near-threshold entries, which the threshold gradient needs.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def jumprelu_encode_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr,
    list_idx_ptr, list_pre_ptr, list_rank_ptr, list_cnt_ptr, act_cnt_ptr, col_cnt_ptr, fire_cnt_ptr,
    f_ptr,
    B, D, W, seg_width, half_bandwidth,
    stride_xb, stride_xd, stride_wd, stride_wn,
    N_SEG: tl.constexpr, DENSE_F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    # The lists of token r, segment s start at (r * N_SEG + s) * seg_width. Offsets inside this
    # program's row block fit in 32 bits; 64-bit per-element addresses would spill registers.
    row_stride = N_SEG * seg_width
    block_base = (pid_m.to(tl.int64) * BLOCK_M * N_SEG + pid_s) * seg_width
    list_idx_ptr += block_base
    list_pre_ptr += block_base
    list_rank_ptr += block_base
    row_off = tl.arange(0, BLOCK_M) * row_stride
    n_kept = tl.zeros((BLOCK_M,), dtype=tl.int32)
    n_active = tl.zeros((BLOCK_M,), dtype=tl.int32)
    seg_start = pid_s * seg_width
    seg_end = tl.minimum(seg_start + seg_width, W)
    ks = tl.arange(0, BLOCK_K)
    for n0 in range(seg_start, seg_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < seg_end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            a = tl.load(x_ptr + rows64[:, None] * stride_xb + k[None, :] * stride_xd,
                        mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
            w = tl.load(w_ptr + k[:, None] * stride_wd + cols[None, :] * stride_wn,
                        mask=(k[:, None] < D) & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        pre = acc + bias[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        active = (pre > theta[None, :]) & valid
        near = (tl.abs(pre - theta[None, :]) < half_bandwidth) & valid
        if DENSE_F:
            f = tl.where(active, pre, 0.0).to(f_ptr.dtype.element_ty)
            tl.store(f_ptr + rows64[:, None] * W + cols[None, :], f, mask=valid)
            keep = near.to(tl.int32)
        else:
            keep = (active | near).to(tl.int32)
        dst = (row_off + n_kept)[:, None] + tl.cumsum(keep, axis=1) - keep
        kept = keep != 0
        tl.store(list_idx_ptr + dst, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=kept)
        tl.store(list_pre_ptr + dst, pre, mask=kept)
        tl.store(list_rank_ptr + dst, tl.cumsum(keep, axis=0) - keep, mask=kept)
        active_i = active.to(tl.int32)
        tl.store(col_cnt_ptr + pid_m.to(tl.int64) * W + cols, tl.sum(keep, axis=0), mask=col_ok)
        tl.store(fire_cnt_ptr + pid_m.to(tl.int64) * W + cols, tl.sum(active_i, axis=0), mask=col_ok)
        n_kept += tl.sum(keep, axis=1)
        n_active += tl.sum(active_i, axis=1)
    tl.store(list_cnt_ptr + rows64 * N_SEG + pid_s, n_kept, mask=row_ok)
    tl.store(act_cnt_ptr + rows64 * N_SEG + pid_s, n_active, mask=row_ok)


def jumprelu_encode(x, W_enc, b_enc, theta, bandwidth, *, n_seg, block_m, block_n, block_k,
                    input_precision="ieee", num_warps=4, num_stages=3, dense_f=False,
                    alloc=torch.empty):
    """Launch the encoder; returns the buffers described in the module docstring (and f [B, W]
    in x's dtype when dense_f)."""
    B, D = x.shape
    W = W_enc.shape[1]
    seg_width = triton.cdiv(triton.cdiv(W, n_seg), block_n) * block_n
    n_seg = triton.cdiv(W, seg_width)
    n_rb = triton.cdiv(B, block_m)
    dev = x.device
    out = dict(
        list_idx=alloc((B, n_seg, seg_width), dtype=torch.int32, device=dev),
        list_pre=alloc((B, n_seg, seg_width), dtype=torch.float32, device=dev),
        list_rank=alloc((B, n_seg, seg_width), dtype=torch.int32, device=dev),
        list_cnt=alloc((B, n_seg), dtype=torch.int32, device=dev),
        act_cnt=alloc((B, n_seg), dtype=torch.int32, device=dev),
        col_cnt=alloc((n_rb, W), dtype=torch.int32, device=dev),
        fire_cnt=alloc((n_rb, W), dtype=torch.int32, device=dev),
        n_seg=n_seg, seg_width=seg_width, block_m=block_m,
        f=alloc((B, W), dtype=x.dtype, device=dev) if dense_f else None,
    )
    jumprelu_encode_kernel[(n_rb, n_seg)](
        x, W_enc, b_enc, theta,
        out["list_idx"], out["list_pre"], out["list_rank"], out["list_cnt"], out["act_cnt"],
        out["col_cnt"], out["fire_cnt"], out["f"] if dense_f else out["list_pre"],
        B, D, W, seg_width, 0.5 * float(bandwidth),
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        N_SEG=n_seg, DENSE_F=dense_f, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        INPUT_PRECISION=input_precision, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def jumprelu_encode_reference(x, W_enc, b_enc, theta, bandwidth):
    """What the encoder's lists mean, densely: pre, active and kept (active or near) masks."""
    pre = x.double() @ W_enc.double() + b_enc.double()
    active = pre > theta.double()
    near = (pre - theta.double()).abs() < 0.5 * bandwidth
    return pre, active, active | near

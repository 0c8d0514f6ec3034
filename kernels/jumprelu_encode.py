"""Encoder GEMM with the JumpReLU threshold fused into its epilogue.

pre = x @ W_enc + b_enc is computed tile by tile in registers (fp32 accumulation). The epilogue
keeps only the entries the rest of the op needs: latents that are *active* (pre > theta) or *near*
the threshold (|pre - theta| < bandwidth/2, which the threshold's STE gradient needs even when the
latent is off). It does no scans: every output is a masked store or a plain reduction.

    pre[b, n]        pre-activation (fp32), stored only where entry (b, n) is kept; the other
                     elements are never written and never read
    keep[b, w]       bit j of int32 word w says whether latent 32 w + j is kept for token b
    col_cnt[m, n]    number of tokens of row block m that kept latent n
    fire_cnt[m, n]   number of those on which latent n is active (firings; their sum is B * L0)

A separate small kernel (list_compact.py) turns the bitmask into per-token lists of kept latents
in increasing order; consumers read pre at [b, n] from the buffer above.

One program owns one row block and one column segment and walks the segment's column tiles in
order, so every element above has exactly one writer and the same bits on every run. Segments
only spread the grid over the chip; they are multiples of the tile width, itself a multiple of
32, so a bitmask word never straddles two programs.

Dense mode (DENSE_F): when most latents fire, lists lose to tensor cores. The epilogue then also
writes f = pre * H(pre - theta) densely in the operand dtype (for the dense decode and backward
GEMMs), and keeps only the near-threshold entries, which the threshold gradient needs.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl

WORD_BITS = 32       # latents per bitmask word (int32)


@triton.jit
def jumprelu_encode_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr,
    pre_ptr, keep_ptr, col_cnt_ptr, fire_cnt_ptr, f_ptr,
    B, D, W, seg_width, half_bandwidth,
    stride_xb, stride_xd, stride_wd, stride_wn,
    DENSE_F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_N % 32 == 0)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    n_words = tl.cdiv(W, 32)
    # Offsets inside this program's row block fit in 32 bits; 64-bit per-element addresses
    # would cost registers in the epilogue.
    pre_ptr += pid_m.to(tl.int64) * BLOCK_M * W
    f_ptr += pid_m.to(tl.int64) * BLOCK_M * W
    keep_ptr += pid_m.to(tl.int64) * BLOCK_M * n_words
    row_off = tl.arange(0, BLOCK_M) * W
    word_off = tl.arange(0, BLOCK_M) * n_words
    lanes = tl.arange(0, 32)
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
            tl.store(f_ptr + row_off[:, None] + cols[None, :], f, mask=valid)
            kept = near
        else:
            kept = active | near
        tl.store(pre_ptr + row_off[:, None] + cols[None, :], pre, mask=kept)
        kept_i = kept.to(tl.int32)
        tl.store(col_cnt_ptr + pid_m.to(tl.int64) * W + cols, tl.sum(kept_i, axis=0), mask=col_ok)
        tl.store(fire_cnt_ptr + pid_m.to(tl.int64) * W + cols,
                 tl.sum(active.to(tl.int32), axis=0), mask=col_ok)
        # Pack 32 keep flags per word: distinct powers of two, so their sum is their OR (bit 31
        # wraps to the sign bit, which is the bit pattern wanted).
        bits = tl.reshape(kept_i, (BLOCK_M, BLOCK_N // 32, 32)) << lanes[None, None, :]
        words = tl.sum(bits, axis=2)
        wcols = n0 // 32 + tl.arange(0, BLOCK_N // 32)
        tl.store(keep_ptr + word_off[:, None] + wcols[None, :], words,
                 mask=row_ok[:, None] & (wcols < n_words)[None, :])


def encode_buffers(B, W, *, block_m, dtype, dense_f=False, device="cpu", alloc=torch.empty):
    """The encoder's outputs, allocated (also used to count the op's memory on the meta device)."""
    n_rb = triton.cdiv(B, block_m)
    return dict(
        pre=alloc((B, W), dtype=torch.float32, device=device),
        keep=alloc((B, triton.cdiv(W, WORD_BITS)), dtype=torch.int32, device=device),
        col_cnt=alloc((n_rb, W), dtype=torch.int32, device=device),
        fire_cnt=alloc((n_rb, W), dtype=torch.int32, device=device),
        f=alloc((B, W), dtype=dtype, device=device) if dense_f else None,
        block_m=block_m,
    )


def jumprelu_encode(x, W_enc, b_enc, theta, bandwidth, *, n_seg, block_m, block_n, block_k,
                    input_precision="ieee", num_warps=4, num_stages=3, dense_f=False,
                    alloc=torch.empty):
    """Launch the encoder; returns the buffers described in the module docstring (and f [B, W]
    in x's dtype when dense_f)."""
    if block_n % WORD_BITS:
        raise ValueError(f"block_n must be a multiple of {WORD_BITS}, got {block_n}")
    B, D = x.shape
    W = W_enc.shape[1]
    seg_width = triton.cdiv(triton.cdiv(W, n_seg), block_n) * block_n
    n_seg = triton.cdiv(W, seg_width)
    n_rb = triton.cdiv(B, block_m)
    out = encode_buffers(B, W, block_m=block_m, dtype=x.dtype, dense_f=dense_f, device=x.device,
                         alloc=alloc)
    jumprelu_encode_kernel[(n_rb, n_seg)](
        x, W_enc, b_enc, theta,
        out["pre"], out["keep"], out["col_cnt"], out["fire_cnt"],
        out["f"] if dense_f else out["pre"],
        B, D, W, seg_width, 0.5 * float(bandwidth),
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        DENSE_F=dense_f, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        INPUT_PRECISION=input_precision, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def jumprelu_encode_reference(x, W_enc, b_enc, theta, bandwidth):
    """What the encoder's outputs mean, densely: pre, active and kept (active or near) masks."""
    pre = x.double() @ W_enc.double() + b_enc.double()
    active = pre > theta.double()
    near = (pre - theta.double()).abs() < 0.5 * bandwidth
    return pre, active, active | near

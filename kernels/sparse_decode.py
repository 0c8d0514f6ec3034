"""Sparse decode: x_hat = f @ W_dec + b_dec by gathering the decoder rows of active latents.

Reads the per-token lists of kept latents (list_compact.py) and their pre-activations, which the
encoder stored at [token, latent] (jumprelu_encode.py). One program owns one token and one block
of output features; it walks the token's kept entries in list order, so x_hat has the same bits on
every run. b_dec, the residual and the squared error are fused: the program writes x_hat and its
partial sum of (x_hat - x)^2, which the wrapper sums in a fixed order; the programs of the first
feature block also write the token's number of active latents (its L0).
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def sparse_decode_kernel(
    list_idx_ptr, pre_ptr, list_cnt_ptr, theta_ptr, w_dec_ptr, b_dec_ptr, x_ptr,
    x_hat_ptr, sq_err_ptr, l0_tok_ptr,
    D, W,
    stride_wn, stride_wd, stride_xb, stride_xd, stride_hb, stride_hd,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    es = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_active = tl.zeros((BLOCK_E,), dtype=tl.int32)
    n = tl.load(list_cnt_ptr + row)
    base = row * W
    for e0 in range(0, n, BLOCK_E):
        e_ok = (e0 + es) < n
        idx = tl.load(list_idx_ptr + base + e0 + es, mask=e_ok, other=0)
        pre = tl.load(pre_ptr + base + idx, mask=e_ok, other=0.0)
        theta = tl.load(theta_ptr + idx, mask=e_ok, other=0.0).to(tl.float32)
        f = tl.where(e_ok & (pre > theta), pre, 0.0)
        n_active += (e_ok & (pre > theta)).to(tl.int32)
        w = tl.load(w_dec_ptr + idx.to(tl.int64)[:, None] * stride_wn + dcols[None, :] * stride_wd,
                    mask=(f != 0.0)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(f[:, None] * w.to(tl.float32), axis=0)
    x_hat = acc + tl.load(b_dec_ptr + dcols, mask=d_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_xb + dcols * stride_xd, mask=d_ok, other=0.0).to(tl.float32)
    resid = tl.where(d_ok, x_hat - x, 0.0)
    tl.store(x_hat_ptr + row * stride_hb + dcols * stride_hd, x_hat, mask=d_ok)
    tl.store(sq_err_ptr + row * tl.num_programs(1) + pid_d, tl.sum(resid * resid, axis=0))
    if pid_d == 0:
        tl.store(l0_tok_ptr + row, tl.sum(n_active, axis=0))


def sparse_decode(enc, theta, W_dec, b_dec, x, *, block_e, block_d, num_warps=4,
                  out_dtype=torch.float32, alloc=torch.empty):
    """x_hat [B, d], per-(token, feature block) partial squared errors [B, n_d], and each token's
    number of active latents [B] (int32)."""
    B, D = x.shape
    n_d = triton.cdiv(D, block_d)
    x_hat = alloc((B, D), dtype=out_dtype, device=x.device)
    sq_err = alloc((B, n_d), dtype=torch.float32, device=x.device)
    l0_tok = alloc((B,), dtype=torch.int32, device=x.device)
    sparse_decode_kernel[(B, n_d)](
        enc["list_idx"], enc["pre"], enc["list_cnt"], theta, W_dec, b_dec, x, x_hat, sq_err, l0_tok,
        D, enc["pre"].shape[1],
        W_dec.stride(0), W_dec.stride(1), x.stride(0), x.stride(1), x_hat.stride(0), x_hat.stride(1),
        BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps,
    )
    return x_hat, sq_err, l0_tok


def decode_reference(f, W_dec, b_dec, x):
    x_hat = f.double() @ W_dec.double() + b_dec.double()
    return x_hat, (x_hat - x.double()).pow(2).sum(-1)

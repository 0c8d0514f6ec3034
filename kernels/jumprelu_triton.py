"""Triton backend of `kernels.jumprelu_sae`: the fused forward and the sparse STE backward.

Forward   jumprelu_encode.py  encoder GEMM; epilogue: b_enc, threshold, L0 counts, and per-token
                              lists of the active and near-threshold latents (pre never stored)
          sparse_decode.py    x_hat = f W_dec + b_dec from the lists, residual and squared error
Backward  entry_grad.py       df = g W_dec^T at the kept entries only
          latent_transpose.py per-latent lists by a counting sort without atomics
          latent_grads.py     dW_enc, dW_dec, db_enc, dtheta per latent, fixed summation order
          db_dec = sum_b g    (torch, deterministic reduction)

Everything is launched asynchronously: no `.item()`, no allocation sized by device values, so a
training step never waits on the host. Results are the same bits for the same inputs (no atomics).

Matmul precision: "bf16" (default on CUDA: bf16 operands, fp32 accumulation), "fp16", "tf32", or
"fp32" (IEEE; the default off CUDA, i.e. under TRITON_INTERPRET=1). Set it with
`set_matmul_precision`, the environment variable JUMPSCOPE_MATMUL_PRECISION, or the keyword
argument. Parameters stay in their own dtype (fp32 master weights); gradients come back in it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402

from .entry_grad import entry_grad
from .jumprelu_encode import jumprelu_encode
from .latent_grads import latent_grads
from .latent_transpose import latent_transpose
from .sparse_decode import sparse_decode

PRECISIONS = {  # name -> (operand dtype, tl.dot input_precision)
    "bf16": (torch.bfloat16, "ieee"),
    "fp16": (torch.float16, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "fp32": (torch.float32, "ieee"),
}
_matmul_precision: str | None = os.environ.get("JUMPSCOPE_MATMUL_PRECISION") or None

# Tests set this to fill every buffer the kernels allocate with garbage (NaN, or -7777 for
# integers) so that an element a kernel forgot to write cannot pass as a plausible value.
POISON_BUFFERS = False


def set_matmul_precision(name: str | None) -> None:
    if name is not None and name not in PRECISIONS:
        raise ValueError(f"matmul precision {name!r}: choose one of {sorted(PRECISIONS)}")
    global _matmul_precision
    _matmul_precision = name


def _alloc(shape, dtype, device):
    if not POISON_BUFFERS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7777
    return torch.full(shape, fill, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Blocks:
    enc_m: int
    enc_n: int
    enc_k: int
    enc_warps: int
    enc_stages: int
    entries: int      # list entries per chunk in the gather kernels
    feat: int         # features per program / chunk in the gather kernels
    tokens: int       # tokens per chunk in the per-latent reduction
    gather_warps: int


def _blocks(B: int, D: int, W: int, device: torch.device) -> tuple[Blocks, int]:
    """Block sizes and the number of column segments of the encoder grid."""
    if _interpreting() or device.type != "cuda":
        # Small blocks so that the CPU tests exercise several tiles, segments and chunks.
        blocks = Blocks(16, 16, 16, 4, 1, 8, 16, 8, 4)
        return blocks, 3
    blocks = Blocks(128, 128, 64, 8, 3, 32, min(256, triton.next_power_of_2(D)), 32, 4)
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    n_rb = triton.cdiv(B, blocks.enc_m)
    # Enough (row block, segment) programs to fill the chip twice; each segment walks its tiles.
    n_seg = max(1, min(triton.cdiv(W, blocks.enc_n), triton.cdiv(2 * n_sm, n_rb)))
    return blocks, n_seg


class JumpReLUSAETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, W_dec, b_dec, bandwidth, lam, precision):
        op_dtype, input_precision = PRECISIONS[precision]
        B, D = x.shape
        W = W_enc.shape[1]
        blocks, n_seg = _blocks(B, D, W, x.device)
        x_op = x.to(op_dtype).contiguous()
        w_enc_op = W_enc.to(op_dtype)
        w_dec_op = W_dec.to(op_dtype).contiguous()
        theta_c = theta.contiguous()
        enc = jumprelu_encode(x_op, w_enc_op, b_enc.contiguous(), theta_c, bandwidth, n_seg=n_seg,
                              block_m=blocks.enc_m, block_n=blocks.enc_n, block_k=blocks.enc_k,
                              input_precision=input_precision, num_warps=blocks.enc_warps,
                              num_stages=blocks.enc_stages, alloc=_alloc)
        x_hat, sq_err = sparse_decode(enc, theta_c, w_dec_op, b_dec.contiguous(), x,
                                      block_e=blocks.entries, block_d=blocks.feat,
                                      num_warps=blocks.gather_warps, out_dtype=W_dec.dtype,
                                      alloc=_alloc)
        out_dtype = W_dec.dtype
        mse = (sq_err.sum() / B).to(out_dtype)
        l0 = (enc["act_cnt"].sum(dtype=torch.int64).to(torch.float32) / B).to(out_dtype)
        loss = mse + lam * l0
        ctx.save_for_backward(x, x_op, x_hat, theta_c, w_dec_op, enc["list_idx"], enc["list_pre"],
                              enc["list_rank"], enc["list_cnt"], enc["col_cnt"])
        ctx.meta = (bandwidth, lam, blocks, enc["n_seg"], enc["seg_width"], W_enc.dtype, b_enc.dtype,
                    theta.dtype, W_dec.dtype, b_dec.dtype)
        return loss, mse, l0, x_hat

    @staticmethod
    def backward(ctx, g_loss, g_mse, g_l0, g_xhat):
        (x, x_op, x_hat, theta, w_dec_op, list_idx, list_pre, list_rank, list_cnt,
         col_cnt) = ctx.saved_tensors
        (bandwidth, lam, blocks, n_seg, seg_width, dt_wenc, dt_benc, dt_theta, dt_wdec,
         dt_bdec) = ctx.meta
        B, D = x.shape
        W = theta.shape[0]
        enc = dict(list_idx=list_idx, list_pre=list_pre, list_rank=list_rank, list_cnt=list_cnt,
                   col_cnt=col_cnt, n_seg=n_seg, seg_width=seg_width, block_m=blocks.enc_m)
        zero = x_hat.new_zeros(())
        g_loss = zero if g_loss is None else g_loss
        g_mse = zero if g_mse is None else g_mse
        g_l0 = zero if g_l0 is None else g_l0
        g = ((g_loss + g_mse).float() * (2.0 / B)) * (x_hat.float() - x.float())
        if g_xhat is not None:
            g = g + g_xhat.float()
        g = g.contiguous()
        c0 = ((g_loss.float() * lam + g_l0.float()) / B).reshape(1)
        list_df = entry_grad(enc, g, w_dec_op, block_e=blocks.entries, block_d=blocks.feat,
                             num_warps=blocks.gather_warps, alloc=_alloc)
        latent_src, col_ptr, col_tot = latent_transpose(enc, W, block_e=blocks.entries,
                                                        num_warps=blocks.gather_warps, alloc=_alloc)
        dw_enc_t, dw_dec, db_enc, dtheta = latent_grads(
            latent_src, col_ptr, col_tot, enc, list_df, theta, c0, x_op, g, bandwidth,
            block_t=blocks.tokens, block_d=blocks.feat, num_warps=blocks.gather_warps, alloc=_alloc)
        db_dec = g.sum(0)
        return (None, dw_enc_t.t().to(dt_wenc), db_enc.to(dt_benc), dtheta.to(dt_theta),
                dw_dec.to(dt_wdec), db_dec.to(dt_bdec), None, None, None)


def jumprelu_sae_triton(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth=1e-3, lam=0.0,
                        precision: str | None = None):
    """(loss, mse, l0, x_hat); differentiable in W_enc, b_enc, threshold, W_dec, b_dec."""
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, d_in], got shape {tuple(x.shape)}")
    if not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be positive and finite, got {bandwidth}")
    if x.shape[0] == 0:
        from .reference import jumprelu_sae_reference
        return jumprelu_sae_reference(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, lam)
    precision = precision or _matmul_precision or ("bf16" if x.is_cuda else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision {precision!r}: choose one of {sorted(PRECISIONS)}")
    return JumpReLUSAETriton.apply(x, W_enc, b_enc, threshold, W_dec, b_dec, float(bandwidth),
                                   float(lam), precision)

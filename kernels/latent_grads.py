"""Backward, step 3: every parameter gradient that is a sum over tokens, per latent.

One program owns a block of BLOCK_L consecutive latents and one block of features. For each
latent n in turn it walks n's token list (built by latent_transpose.py, tokens in increasing
order) in fixed-size chunks, reads pre and df of each entry at [token, n] of their [B, W] buffers,
and computes

    dW_enc[:, n] = sum_b dpre[b, n] x[b, :]        dpre = df * H(pre - theta)   (+ STE term, below)
    dW_dec[n, :] = sum_b f[b, n] g[b, :]
    db_enc[n]    = sum_b dpre[b, n]
    near_df[n]   = sum_{b near} df[b, n]        near_coef[n] = sum_{b near} coef[b, n]

with "near" = |pre - theta| < eps/2 (rectangle kernel) and coef[b, n] = c0 + t[b] + u[n]: c0 =
(dL/dloss * lam + dL/dl0) / B read from device memory (no host synchronisation), t and u the
incoming gradients of the per-token L0 counts and per-latent firing counts when a penalty uses them
(HAS_T, HAS_U; kernels/reference.py). The launcher forms dtheta from near_df and near_coef
(reference.threshold_grad), after pooling them with earlier steps' if asked. With STE_TO_INPUT, near entries add
(theta_n df[b, n] + coef[b, n]) / eps to dpre (Anthropic's straight-through gradient to the inputs).
Latents nobody kept get zeros. Each output element has one writer and a fixed summation order:
same inputs, same bits. dW_enc is [d, W]: its columns are collected in a [features, BLOCK_L]
register tile and stored together, so the gradient lands in the parameter's own layout (no
transposed copy) with BLOCK_L-long contiguous runs. With WEIGHT_GRADS off (the dense path, whose
lists hold only near-threshold entries and whose weight gradients come from GEMMs) the two sums
are computed, and with STE_TO_INPUT also the straight-through part of dW_enc and db_enc, which the
launcher adds to the GEMMs' results.
"""
from __future__ import annotations

import torch

from . import _interpret  # noqa: F401  (before triton)
import triton  # noqa: E402
import triton.language as tl


@triton.jit
def latent_grads_kernel(
    latent_src_ptr, col_ptr_ptr, col_tot_ptr, pre_ptr, df_ptr, theta_ptr, c0_ptr, t_ptr, u_ptr,
    x_ptr, g_ptr, dw_enc_ptr, dw_dec_ptr, db_enc_ptr, near_df_ptr, near_coef_ptr,
    D, W, half_bandwidth, inv_bandwidth,
    stride_xb, stride_xd, stride_gb, stride_gd,
    WEIGHT_GRADS: tl.constexpr, STE_TO_INPUT: tl.constexpr, HAS_T: tl.constexpr, HAS_U: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * BLOCK_L
    pid_d = tl.program_id(1)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    ts = tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_L)
    c0 = tl.load(c0_ptr).to(tl.float32)
    enc_tile = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for j in range(BLOCK_L):
        latent = first + j
        ok = latent < W
        start = tl.load(col_ptr_ptr + latent, mask=ok, other=0).to(tl.int64)
        n = tl.load(col_tot_ptr + latent, mask=ok, other=0)
        theta = tl.load(theta_ptr + latent, mask=ok, other=0.0).to(tl.float32)
        coef_n = c0
        if HAS_U:
            coef_n += tl.load(u_ptr + latent, mask=ok, other=0.0).to(tl.float32)
        acc_enc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_dec = tl.zeros((BLOCK_D,), dtype=tl.float32)
        sum_dpre = tl.zeros((BLOCK_T,), dtype=tl.float32)
        sum_near_df = tl.zeros((BLOCK_T,), dtype=tl.float32)
        sum_near_coef = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for t0 in range(0, n, BLOCK_T):
            t_ok = (t0 + ts) < n
            token = tl.load(latent_src_ptr + start + t0 + ts, mask=t_ok, other=0).to(tl.int64)
            pre = tl.load(pre_ptr + token * W + latent, mask=t_ok, other=0.0)
            df = tl.load(df_ptr + token * W + latent, mask=t_ok, other=0.0)
            active = t_ok & (pre > theta)
            near = t_ok & (tl.abs(pre - theta) < half_bandwidth)
            coef = coef_n + tl.zeros((BLOCK_T,), dtype=tl.float32)
            if HAS_T:
                coef += tl.load(t_ptr + token, mask=t_ok, other=0.0).to(tl.float32)
            near_df = tl.where(near, df, 0.0)
            near_coef = tl.where(near, coef, 0.0)
            sum_near_df += near_df
            sum_near_coef += near_coef
            ste_in = (theta * near_df + near_coef) * inv_bandwidth
            if WEIGHT_GRADS or STE_TO_INPUT:
                if WEIGHT_GRADS and STE_TO_INPUT:
                    dpre = tl.where(active, df + ste_in, ste_in)
                    uses_x = active | near
                elif WEIGHT_GRADS:
                    dpre = tl.where(active, df, 0.0)
                    uses_x = active
                else:
                    dpre = ste_in
                    uses_x = near
                x = tl.load(x_ptr + token[:, None] * stride_xb + dcols[None, :] * stride_xd,
                            mask=uses_x[:, None] & d_ok[None, :], other=0.0)
                acc_enc += tl.sum(dpre[:, None] * x.to(tl.float32), axis=0)
                sum_dpre += dpre
            if WEIGHT_GRADS:
                f = tl.where(active, pre, 0.0)
                g = tl.load(g_ptr + token[:, None] * stride_gb + dcols[None, :] * stride_gd,
                            mask=active[:, None] & d_ok[None, :], other=0.0)
                acc_dec += tl.sum(f[:, None] * g.to(tl.float32), axis=0)
        if WEIGHT_GRADS or STE_TO_INPUT:
            enc_tile = tl.where(lanes[None, :] == j, acc_enc[:, None], enc_tile)
        if WEIGHT_GRADS:
            tl.store(dw_dec_ptr + latent * D + dcols, acc_dec, mask=d_ok & (dcols * 0 + latent < W))
        if pid_d == 0:
            if WEIGHT_GRADS or STE_TO_INPUT:
                tl.store(db_enc_ptr + latent, tl.sum(sum_dpre, axis=0), mask=ok)
            tl.store(near_df_ptr + latent, tl.sum(sum_near_df, axis=0), mask=ok)
            tl.store(near_coef_ptr + latent, tl.sum(sum_near_coef, axis=0), mask=ok)
    if WEIGHT_GRADS or STE_TO_INPUT:
        latents = first + lanes
        tl.store(dw_enc_ptr + dcols.to(tl.int64)[:, None] * W + latents[None, :], enc_tile,
                 mask=d_ok[:, None] & (latents < W)[None, :])


def latent_grads(latent_src, col_ptr, col_tot, enc, df, theta, c0, x, g, bandwidth, *,
                 block_l, block_t, block_d, num_warps=4, weight_grads=True, ste_to_input=False,
                 t=None, u=None, alloc=torch.empty):
    """Returns dW_enc [d, W], dW_dec [W, d], db_enc [W], near_df [W], near_coef [W], all float32.
    Without weight_grads: dW_dec is None, and dW_enc, db_enc are the straight-through parts alone
    with ste_to_input, else None. t [B], u [W]: per-token and per-latent step coefficients, or None."""
    W = theta.shape[0]
    B, D = x.shape
    dev = x.device
    near_df = alloc((W,), dtype=torch.float32, device=dev)
    near_coef = alloc((W,), dtype=torch.float32, device=dev)
    enc_grads = weight_grads or ste_to_input
    dw_enc = alloc((D, W), dtype=torch.float32, device=dev) if enc_grads else near_df
    db_enc = alloc((W,), dtype=torch.float32, device=dev) if enc_grads else near_df
    dw_dec = alloc((W, D), dtype=torch.float32, device=dev) if weight_grads else near_df
    grid = (triton.cdiv(W, block_l), triton.cdiv(D, block_d) if enc_grads else 1)
    latent_grads_kernel[grid](
        latent_src, col_ptr, col_tot, enc["pre"], df, theta, c0,
        t if t is not None else c0, u if u is not None else c0,
        x, g, dw_enc, dw_dec, db_enc, near_df, near_coef,
        D, W, 0.5 * float(bandwidth), 1.0 / float(bandwidth),
        x.stride(0), x.stride(1), g.stride(0), g.stride(1),
        WEIGHT_GRADS=weight_grads, STE_TO_INPUT=ste_to_input, HAS_T=t is not None, HAS_U=u is not None,
        BLOCK_L=block_l, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    return (dw_enc if enc_grads else None, dw_dec if weight_grads else None,
            db_enc if enc_grads else None, near_df, near_coef)

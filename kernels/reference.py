"""Plain-PyTorch JumpReLU SAE forward and straight-through backward (shared/DESIGN.md, "The SAE").

This is the CPU default and the oracle every fused kernel is tested against. The backward is written
out by hand, formula for formula, rather than left to autograd: the threshold's pseudo-derivative
does not exist in autograd's view of a Heaviside step.

Besides loss = mse + lam * l0, the op returns two differentiable counts through which any other
sparsity penalty reaches the thresholds with the same straight-through estimator:
`l0_tokens` [B] (active latents per token: Gemma Scope 2's quadratic penalty toward a target L0 is a
function of it) and `fire_counts` [W] (tokens each latent fired on: a penalty on latents that fire
too often is a function of it). Their incoming gradients t_b and u_i join the L0 term's c0 in the
coefficient of each step H(pre_bi - theta_i):

    coef[b, i] = c0 + t_b + u_i,        c0 = (dL/dloss * lam + dL/dl0) / B
    dtheta_i   = -(1/eps) sum_b K_bi (theta_i df_bi + coef[b, i])

`ste_to_input=True` (Anthropic's JumpReLU) also passes the straight-through gradient to the
pre-activations, hence to W_enc and b_enc: dpre_bi = df_bi H_bi + (1/eps) K_bi (theta_i df_bi + coef[b, i]).

The threshold gradient is formed from two per-latent sums over the near-threshold entries of the
batch, near_df_i = sum_b K_bi df_bi and near_coef_i = sum_b K_bi coef[b, i], by `threshold_grad`;
both backends do it the same way, and `threshold_pool` (a callable (near_df, near_coef) -> pooled
pair, train/sae/threshold_pool.py) may pool them with earlier steps' before they are combined.
"""
from __future__ import annotations

import torch


def threshold_grad(theta, near_df, near_coef, bandwidth: float) -> torch.Tensor:
    """dtheta_i = -(theta_i near_df_i + near_coef_i) / eps (see the module's docstring)."""
    return -(theta * near_df + near_coef) / bandwidth


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1 where |u| < 1/2, else 0 (the STE kernel)."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUSAEReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, W_dec, b_dec, bandwidth: float, lam: float, ste_to_input: bool,
                threshold_pool=None):
        pre = x @ W_enc + b_enc
        active = pre > theta
        f = pre * active
        x_hat = f @ W_dec + b_dec
        B = x.shape[0]
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l0_tokens = active.sum(-1, dtype=x.dtype)
        l0 = l0_tokens.mean() if B else x.new_zeros(())
        loss = mse + lam * l0
        firings = active.sum(0, dtype=torch.int64)   # tokens on which each latent fired
        fire_counts = firings.to(x.dtype)
        ctx.save_for_backward(x, pre, theta, W_dec, x_hat)
        ctx.bandwidth, ctx.lam, ctx.ste_to_input, ctx.threshold_pool = bandwidth, lam, ste_to_input, threshold_pool
        ctx.mark_non_differentiable(firings)
        return loss, mse, l0, x_hat, firings, l0_tokens, fire_counts

    @staticmethod
    def backward(ctx, g_loss, g_mse, g_l0, g_xhat, g_firings, g_l0_tokens, g_fire_counts):
        x, pre, theta, W_dec, x_hat = ctx.saved_tensors
        eps, lam = ctx.bandwidth, ctx.lam
        B = max(x.shape[0], 1)
        u = pre - theta
        active = (u > 0).to(pre.dtype)
        f = pre * active
        # d(total)/d x_hat: the reconstruction term of loss and of mse, plus any direct use of x_hat.
        g = (g_loss + g_mse) * 2.0 * (x_hat - x) / B
        if g_xhat is not None:
            g = g + g_xhat
        dW_dec = f.T @ g
        db_dec = g.sum(0)
        df = g @ W_dec.T
        dpre = df * active                      # (+ the STE term with ste_to_input, below)
        # The rectangle window K((pre - theta) / eps) / eps is non-zero on few entries (the near-
        # threshold ones): the STE terms are computed there only, including inactive latents, whose
        # df the threshold gradient needs.
        b, i = (rectangle(u / eps) > 0).nonzero(as_tuple=True)
        coef = ((g_loss * lam + g_l0) / B).expand(len(b))
        if g_l0_tokens is not None:
            coef = coef + g_l0_tokens[b]
        if g_fire_counts is not None:
            coef = coef + g_fire_counts[i]
        df_near = df[b, i]
        near_df = torch.zeros_like(theta).index_add_(0, i, df_near)
        near_coef = torch.zeros_like(theta).index_add_(0, i, coef)
        if ctx.threshold_pool is not None:
            near_df, near_coef = ctx.threshold_pool(near_df, near_coef)
        dtheta = threshold_grad(theta, near_df, near_coef, eps)
        if ctx.ste_to_input:
            dpre = dpre.index_put((b, i), (theta[i] * df_near + coef) / eps, accumulate=True)
        dW_enc = x.T @ dpre
        db_enc = dpre.sum(0)
        return None, dW_enc, db_enc, dtheta, dW_dec, db_dec, None, None, None, None


def jumprelu_sae_reference(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth=1e-3, sparsity_coeff=0.0,
                           return_firings=False, ste_to_input=False, return_counts=False, threshold_pool=None):
    """(loss, mse, l0, x_hat), plus firings (int64 [W]) with return_firings, plus the differentiable
    counts (l0_tokens [B], fire_counts [W]) with return_counts."""
    out = JumpReLUSAEReference.apply(x, W_enc, b_enc, threshold, W_dec, b_dec,
                                     float(bandwidth), float(sparsity_coeff), bool(ste_to_input), threshold_pool)
    if return_counts:
        return out
    return out[:5] if return_firings else out[:4]

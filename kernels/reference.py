"""Plain-PyTorch JumpReLU SAE forward and straight-through backward (shared/DESIGN.md, "The SAE").

This is the CPU default and the oracle every fused kernel is tested against. The backward is written
out by hand, formula for formula, rather than left to autograd: the threshold's pseudo-derivative
does not exist in autograd's view of a Heaviside step.
"""
from __future__ import annotations

import torch


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1 where |u| < 1/2, else 0 (the STE kernel)."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUSAEReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, W_dec, b_dec, bandwidth: float, lam: float):
        pre = x @ W_enc + b_enc
        active = pre > theta
        f = pre * active
        x_hat = f @ W_dec + b_dec
        B = x.shape[0]
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l0 = active.sum(-1, dtype=x.dtype).mean() if B else x.new_zeros(())
        loss = mse + lam * l0
        firings = active.sum(0, dtype=torch.int64)   # tokens on which each latent fired
        ctx.save_for_backward(x, pre, theta, W_dec, x_hat)
        ctx.bandwidth, ctx.lam = bandwidth, lam
        ctx.mark_non_differentiable(firings)
        return loss, mse, l0, x_hat, firings

    @staticmethod
    def backward(ctx, g_loss, g_mse, g_l0, g_xhat, g_firings):
        x, pre, theta, W_dec, x_hat = ctx.saved_tensors
        eps, lam = ctx.bandwidth, ctx.lam
        B = max(x.shape[0], 1)
        active = (pre > theta).to(pre.dtype)
        f = pre * active
        # d(total)/d x_hat: the reconstruction term of loss and of mse, plus any direct use of x_hat.
        g = (g_loss + g_mse) * 2.0 * (x_hat - x) / B
        if g_xhat is not None:
            g = g + g_xhat
        dW_dec = f.T @ g
        db_dec = g.sum(0)
        df = g @ W_dec.T
        dpre = df * active                      # no STE term flows to pre
        window = rectangle((pre - theta) / eps) / eps
        # JumpReLU pseudo-derivative (needs df at inactive near-threshold latents) + L0 pseudo-derivative
        dtheta = -(theta * window * df).sum(0) - (g_loss * lam + g_l0) / B * window.sum(0)
        dW_enc = x.T @ dpre
        db_enc = dpre.sum(0)
        return None, dW_enc, db_enc, dtheta, dW_dec, db_dec, None, None


def jumprelu_sae_reference(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth=1e-3, sparsity_coeff=0.0,
                           return_firings=False):
    """(loss, mse, l0, x_hat), plus firings (int64 [W]) with return_firings."""
    out = JumpReLUSAEReference.apply(x, W_enc, b_enc, threshold, W_dec, b_dec,
                                     float(bandwidth), float(sparsity_coeff))
    return out if return_firings else out[:4]

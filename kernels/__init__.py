"""Fused JumpReLU SAE op: `kernels.jumprelu_sae` (shared/DESIGN.md, "The kernel contract").

Hugging Face ships an unrelated PyPI package also imported as `kernels`; `require_ours()` lets
callers fail loudly if that one shadows this package.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _interpret  # noqa: F401  (before anything imports triton)

from .reference import jumprelu_sae_reference

IS_JUMPSCOPE_KERNELS = True
BACKENDS = ("auto", "reference", "triton")


@dataclass
class SAEOutput:
    loss: torch.Tensor   # mse + sparsity_coeff * l0
    mse: torch.Tensor    # mean over the batch of ||x - x_hat||^2
    l0: torch.Tensor     # mean over the batch of the number of active latents
    x_hat: torch.Tensor  # [B, d]
    firings: torch.Tensor | None = None  # int64 [W]: tokens of the batch on which each latent fired
    # Differentiable (straight-through) counts, for sparsity penalties other than lambda * l0:
    l0_tokens: torch.Tensor | None = None    # [B]: active latents per token
    fire_counts: torch.Tensor | None = None  # [W]: tokens each latent fired on (firings as floats)


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def jumprelu_sae(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth: float = 1e-3,
                 sparsity_coeff: float = 0.0, backend: str = "auto", ste_to_input: bool = False,
                 threshold_pool=None) -> SAEOutput:
    """JumpReLU SAE forward; differentiable in the five parameters with DESIGN.md's STE gradients.

    ste_to_input: also pass the straight-through gradient to the pre-activations (Anthropic's
    JumpReLU); `out.l0_tokens` and `out.fire_counts` carry other sparsity penalties to the
    thresholds; threshold_pool: (near_df, near_coef) -> pooled pair, applied to the threshold
    gradient's per-latent sums before they are combined (kernels/reference.py)."""
    backend = _resolve_backend(backend, x)
    if backend == "reference":
        out = jumprelu_sae_reference(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, sparsity_coeff,
                                     ste_to_input=ste_to_input, return_counts=True, threshold_pool=threshold_pool)
    else:
        from .jumprelu_triton import jumprelu_sae_triton
        out = jumprelu_sae_triton(x, W_enc, b_enc, threshold, W_dec, b_dec, bandwidth, sparsity_coeff,
                                  ste_to_input=ste_to_input, return_counts=True, threshold_pool=threshold_pool)
    loss, mse, l0, x_hat, firings, l0_tokens, fire_counts = out
    return SAEOutput(loss=loss, mse=mse, l0=l0, x_hat=x_hat, firings=firings, l0_tokens=l0_tokens,
                     fire_counts=fire_counts)


def require_ours() -> None:
    """Raise if `import kernels` found some other package (e.g. Hugging Face's `kernels`)."""
    import kernels as imported
    if not getattr(imported, "IS_JUMPSCOPE_KERNELS", False):
        raise ImportError(
            f"`import kernels` resolved to {getattr(imported, '__file__', imported)!r}, not this "
            "project's kernels/ package (Hugging Face's `kernels` package shadows it?). Run from the "
            "repository root or `pip uninstall kernels`.")


__all__ = ["jumprelu_sae", "SAEOutput", "require_ours", "triton_available", "jumprelu_sae_reference"]

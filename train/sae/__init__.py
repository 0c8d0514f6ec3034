"""Sparse autoencoders, one module per family: JumpReLU (shared/DESIGN.md, "The SAE") and the
baselines ReLU+L1, TopK, Gated; `base` holds what they share.

`build_sae(cfg, d_in, generator)` makes one from a `SAEConfig` (conf/sae/*.yaml); `ARCHITECTURES`
maps the names recorded in sae.json to classes.
"""
from __future__ import annotations

import torch

from .base import SparseAutoencoder, StepOutput, decoder_init
from .gated import GatedSAE
from .jumprelu import JumpReLUFunction, JumpReLUSAE
from .relu import ReLUSAE
from .topk import TopKSAE

ARCHITECTURES = {cls.architecture: cls for cls in (JumpReLUSAE, ReLUSAE, TopKSAE, GatedSAE)}


def build_sae(cfg, d_in: int, generator: torch.Generator) -> SparseAutoencoder:
    """An SAE from a `SAEConfig` (conf/sae/*.yaml)."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    d_sae = cfg.width if cfg.width > 0 else cfg.expansion * d_in
    if cfg.architecture == "jumprelu":
        return JumpReLUSAE(d_in, d_sae, generator, theta_init=cfg.theta_init, bandwidth=cfg.bandwidth,
                           sparsity_loss=cfg.sparsity_loss, theta_parametrisation=cfg.theta_parametrisation,
                           theta_min=cfg.theta_min)
    if cfg.architecture == "topk":
        return TopKSAE(d_in, d_sae, generator, k=cfg.k, aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff)
    return ARCHITECTURES[cfg.architecture](d_in, d_sae, generator)


__all__ = ["ARCHITECTURES", "GatedSAE", "JumpReLUFunction", "JumpReLUSAE", "ReLUSAE", "SparseAutoencoder",
           "StepOutput", "TopKSAE", "build_sae", "decoder_init"]

"""Sparse autoencoders, one module per family: JumpReLU (shared/DESIGN.md, "The SAE"; with the
sparsity losses of Gemma Scope 2 and Anthropic), TopK and BatchTopK (with Matryoshka prefixes), and
the baselines ReLU+L1 and Gated; `base` holds what they share.

`build_sae(cfg, d_in, generator)` makes one from a `SAEConfig` (conf/sae/*.yaml); `ARCHITECTURES`
maps the names recorded in sae.json to classes.
"""
from __future__ import annotations

import math

import torch

from .base import SparseAutoencoder, StepOutput, decoder_init
from .gated import GatedSAE
from .jumprelu import JumpReLUFunction, JumpReLUSAE
from .relu import ReLUSAE
from .topk import BatchTopKSAE, TopKSAE

ARCHITECTURES = {cls.architecture: cls for cls in (JumpReLUSAE, ReLUSAE, TopKSAE, BatchTopKSAE, GatedSAE)}


def matryoshka_widths(cfg, d_sae: int) -> tuple[int, ...]:
    fractions = list(cfg.matryoshka_fractions)
    if any(not 0 < fr <= 1 for fr in fractions):
        raise ValueError(f"sae.matryoshka_fractions {fractions}: each in (0, 1]")
    return tuple(max(1, round(fr * d_sae)) for fr in fractions)


# sae.tanh_scale_unit's choices (train/members.py checks a member's before any work)
TANH_SCALE_UNITS = ("rms", "sqrt_d")


def tanh_scale(cfg, d_in: int) -> float:
    """c of the tanh penalty on the normalised space (E||x||^2 = 1): sae.tanh_scale, given in the units
    sae.tanh_scale_unit names. Anthropic's c = 4 is on data scaled to E||x||^2 = d_in, where every
    activation is sqrt(d_in) times ours; c f is the same there with c sqrt(d_in) here."""
    if cfg.tanh_scale_unit not in TANH_SCALE_UNITS:
        raise ValueError(f"sae.tanh_scale_unit {cfg.tanh_scale_unit!r}: choose one of {', '.join(TANH_SCALE_UNITS)}")
    return float(cfg.tanh_scale) * (math.sqrt(d_in) if cfg.tanh_scale_unit == "sqrt_d" else 1.0)


def build_sae(cfg, d_in: int, generator: torch.Generator) -> SparseAutoencoder:
    """An SAE from a `SAEConfig` (conf/sae/*.yaml)."""
    sae = _family(cfg, d_in, generator)
    if cfg.decoder_norm > 0:
        sae.free_decoder(float(cfg.decoder_norm))
    return sae


def _family(cfg, d_in: int, generator: torch.Generator) -> SparseAutoencoder:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    if cfg.b_dec_to_input and cfg.architecture != "jumprelu":
        raise ValueError(f"sae.b_dec_to_input is a jumprelu option ({cfg.architecture} encodes x itself)")
    d_sae = cfg.width if cfg.width > 0 else cfg.expansion * d_in
    if cfg.architecture == "jumprelu":
        return JumpReLUSAE(d_in, d_sae, generator, theta_init=cfg.theta_init, bandwidth=cfg.bandwidth,
                           sparsity_loss=cfg.sparsity_loss, theta_parametrisation=cfg.theta_parametrisation,
                           theta_min=cfg.theta_min, target_l0=cfg.target_l0, tanh_scale=tanh_scale(cfg, d_in),
                           ste_to_input=cfg.ste_to_input, pre_act_coeff=cfg.pre_act_coeff,
                           frequency_coeff=cfg.frequency_coeff, frequency_target=cfg.frequency_target,
                           matryoshka_widths=matryoshka_widths(cfg, d_sae),
                           threshold_grad_pool=cfg.threshold_grad_pool,
                           threshold_grad_pool_steps=cfg.threshold_grad_pool_steps,
                           b_dec_to_input=cfg.b_dec_to_input)
    if cfg.architecture == "topk":
        if float(cfg.k) != int(cfg.k):
            raise ValueError(f"topk k must be an integer, got {cfg.k} (batchtopk takes a mean k)")
        return TopKSAE(d_in, d_sae, generator, k=int(cfg.k), aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff)
    if cfg.architecture == "batchtopk":
        return BatchTopKSAE(d_in, d_sae, generator, k=float(cfg.k), aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff,
                            threshold_momentum=cfg.threshold_momentum,
                            matryoshka_widths=matryoshka_widths(cfg, d_sae))
    return ARCHITECTURES[cfg.architecture](d_in, d_sae, generator)


__all__ = ["ARCHITECTURES", "BatchTopKSAE", "GatedSAE", "JumpReLUFunction", "JumpReLUSAE", "ReLUSAE", "SparseAutoencoder",
           "StepOutput", "TANH_SCALE_UNITS", "TopKSAE", "build_sae", "decoder_init", "tanh_scale"]

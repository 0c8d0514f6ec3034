"""Adam with betas (0, 0.999), the learning-rate and lambda warm-ups, and the unit-norm decoder constraint."""
from __future__ import annotations

import math

import torch


def threshold_lr_for(threshold_lr: float, travel: float, total_steps: int) -> float:
    """The thresholds' own learning rate (0: none): log thresholds under Adam move by about their lr
    per step, so a fixed lr that suits a long run leaves a run of a few hundred steps unable to reach
    its thresholds; it is raised to travel / total_steps there (about 8 to 10 in log space over
    a run was enough, 2 was not: the recovery test at 468 steps, the quality benchmark at 4,883)."""
    if threshold_lr <= 0:
        return 0.0
    return max(threshold_lr, travel / max(total_steps, 1)) if travel > 0 else threshold_lr


def make_optimizer(sae, cfg, threshold_lr: float = 0.0) -> torch.optim.Adam:
    """Adam over the SAE's parameters. Groups of their own, whose lr is `lr_scale` times the schedule's lr
    (applied by the caller): a JumpReLU threshold when threshold_lr > 0 (threshold_lr / cfg.lr), the
    biases when cfg.bias_lr_scale != 1. With neither, one group, as before either existed."""
    params = list(sae.parameters())
    threshold, biases = sae.threshold_parameters(), sae.bias_parameters()
    own: list[tuple[list, float]] = []
    if threshold_lr > 0 and threshold:
        own.append((threshold, threshold_lr / cfg.lr))
    if cfg.bias_lr_scale != 1.0 and biases:
        own.append((biases, float(cfg.bias_lr_scale)))
    if not own:
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    taken = {id(p) for group, _ in own for p in group}
    groups = [{"params": [p for p in params if id(p) not in taken]}]
    groups += [{"params": group, "lr_scale": scale} for group, scale in own]
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Cosine warm-up from lr_warmup_start * lr to lr over lr_warmup_steps; optional linear decay at the end."""
    scale = 1.0
    if step < cfg.lr_warmup_steps:
        s = cfg.lr_warmup_start
        scale = s + (1.0 - s) * 0.5 * (1.0 - math.cos(math.pi * step / cfg.lr_warmup_steps))
    decay_steps = int(cfg.lr_decay_fraction * total_steps)
    if decay_steps > 0 and step >= total_steps - decay_steps:
        scale *= (total_steps - step) / decay_steps
    return cfg.lr * scale


def lambda_at(step: int, sparsity_coeff: float, cfg) -> float:
    """lambda ramped linearly from 0 over lambda_warmup_steps."""
    if cfg.lambda_warmup_steps <= 0:
        return sparsity_coeff
    return sparsity_coeff * min(1.0, step / cfg.lambda_warmup_steps)


@torch.no_grad()
def remove_parallel_grad(W_dec: torch.nn.Parameter) -> None:
    """Drop the gradient component along each (unit-norm) decoder row: it would only change the norm."""
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec


@torch.no_grad()
def renormalise_rows(W_dec: torch.nn.Parameter) -> None:
    W_dec /= W_dec.norm(dim=1, keepdim=True)

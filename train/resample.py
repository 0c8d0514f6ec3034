"""Resampling dead latents (Anthropic, "Towards Monosemanticity", 2023): every `optim.resample_every_steps`
steps, within the first `optim.resample_until_fraction` of the run, each latent dead for the member's
`train.dead_window_tokens` is re-initialised toward an input of the current batch that the SAE
reconstructs badly, drawn without replacement with probability proportional to its squared error
||x - x_hat||^2. Its decoder row becomes that input's direction (x - b_dec, unit norm, at the live rows'
mean norm), its encoder column the same direction at `optim.resample_encoder_scale` times the live
columns' mean norm, its bias 0 and its threshold theta_init (`reinitialise_latents` of each family).

Adam's moments for those slices are reset: the first moment to 0, the second to the mean of the live
slices' of the same parameter. A second moment of 0 (Anthropic's and dictionary_learning's reset)
would, with the bias correction of a late step, make the next update about 1/sqrt(1 - beta2) = 32
times the lr with beta1 = 0: the new latent would be thrown off its input on its first step.

The draw uses a generator seeded from the member's seed and the step, so a resumed run resamples as
the uninterrupted one did.
"""
from __future__ import annotations

import torch

from .metrics import LatentStats


def resampling_due(step: int, total_steps: int, cfg) -> bool:
    """Whether the member resamples after step `step` (0-based): at steps k * every, k >= 1, up to
    resample_until_fraction of the run."""
    every = int(cfg.resample_every_steps)
    done = step + 1
    return every > 0 and done % every == 0 and done <= cfg.resample_until_fraction * total_steps


def squared_errors(sae, x: torch.Tensor) -> torch.Tensor:
    """||x - x_hat||^2 of each row of the batch: the weights of the draw."""
    with torch.no_grad():
        return (x - sae(x)).pow(2).sum(-1)


def draw_inputs(weights: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of at most n distinct rows, drawn with probability proportional to `weights` (only rows
    with a positive weight)."""
    n = min(n, int((weights > 0).sum()))
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights.detach().double().cpu(), n, replacement=False, generator=generator)


@torch.no_grad()
def reset_optimizer_slices(optimizer: torch.optim.Optimizer, sae, idx: torch.Tensor, alive: torch.Tensor) -> None:
    """Adam's state of latents `idx`: exp_avg 0, exp_avg_sq the mean of the `alive` latents' slices."""
    for name, axis in sae.latent_axes().items():
        state = optimizer.state.get(sae.get_parameter(name))
        if not state:
            continue
        state["exp_avg"].index_fill_(axis, idx, 0.0)
        sq = state["exp_avg_sq"]
        live_mean = sq.index_select(axis, alive.nonzero().squeeze(1)).mean(axis, keepdim=True)
        shape = list(sq.shape)
        shape[axis] = len(idx)
        sq.index_copy_(axis, idx, live_mean.expand(shape).contiguous())


def resample_dead_latents(sae, optimizer, x: torch.Tensor, stats: LatentStats, encoder_scale: float,
                          seed: int) -> int:
    """Re-initialise the dead latents of `stats` toward rows of the batch x (as many as the batch has rows
    with an error; the rest wait for the next resampling); their statistics start afresh, so that they
    count as dead again only after a whole window without firing. Returns how many were resampled."""
    dead = stats.dead_mask()
    if not bool(dead.any()):
        return 0
    alive = ~dead if bool((~dead).any()) else torch.ones_like(dead)    # none alive: the norms of all
    picks = draw_inputs(squared_errors(sae, x), int(dead.sum()), seed).to(x.device)
    idx = dead.nonzero().squeeze(1)[: len(picks)]
    if len(idx) == 0:
        return 0
    sae.reinitialise_latents(idx, x[picks], encoder_scale, alive)
    reset_optimizer_slices(optimizer, sae, idx, alive)
    stats.revive(idx)
    return len(idx)

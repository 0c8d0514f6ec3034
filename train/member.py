"""One SAE being trained: its parameters, optimizer, schedules, latent statistics and log."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .metrics import LatentStats, MetricsLog
from .optim import lambda_at, lr_at, make_optimizer, remove_parallel_grad, renormalise_rows, threshold_lr_for
from .resample import resample_dead_latents, resampling_due
from .sae import build_sae


# sae.constants_unit's choices (train/config.py says what each means). On data scaled to E||x||^2 = d_in
# a token's activations are sqrt(d_in) times ours, so a constant c there is c / sqrt(d_in) here.
CONSTANTS_UNITS = ("rms", "median_norm", "sqrt_d", "sqrt_d_median_norm")


def uses_median_norm(cfg) -> bool:
    """Whether the member's constants are in units of the median token norm (sae.constants_unit)."""
    return cfg.sae.constants_unit in ("median_norm", "sqrt_d_median_norm")


def in_data_units(cfg, median_norm: float | None, d_in: int):
    """The member's config with its constants (theta_init, bandwidth, threshold_lr, optim.bias_lr_scale;
    optim.grad_clip_norm squared, as the weights' gradients go with the data's square) multiplied by
    the unit sae.constants_unit names, in the normalised space; cfg itself where that is rms."""
    unit = cfg.sae.constants_unit
    if unit not in CONSTANTS_UNITS:
        raise ValueError(f"sae.constants_unit {unit!r}: choose one of {', '.join(CONSTANTS_UNITS)}")
    if unit == "rms":
        return cfg
    r = 1.0
    if uses_median_norm(cfg):
        if median_norm is None or not median_norm > 0:
            raise ValueError(f"sae.constants_unit={unit} needs the cache's median token norm, got {median_norm}")
        r = float(median_norm)
    if unit.startswith("sqrt_d"):
        r /= math.sqrt(d_in)
    cfg = cfg.copy()
    for key in ("theta_init", "bandwidth", "threshold_lr"):
        cfg.sae[key] = cfg.sae[key] * r
    cfg.optim.bias_lr_scale = cfg.optim.bias_lr_scale * r
    cfg.optim.grad_clip_norm = cfg.optim.grad_clip_norm * r * r
    return cfg


class Member:
    def __init__(self, name: str, folder: Path, cfg, d_in: int, total_steps: int, device, backend: str,
                 median_norm: float | None = None):
        """cfg: the member's resolved config (sae, optim, train sections); median_norm: the median token
        norm of the normalised data (for the median-norm constants units)."""
        cfg = in_data_units(cfg, median_norm, d_in)
        self.name, self.folder, self.cfg = name, Path(folder), cfg
        self.total_steps, self.backend = total_steps, backend
        generator = torch.Generator().manual_seed(int(cfg.train.seed))
        self.sae = build_sae(cfg.sae, d_in, generator).to(device)
        self.threshold_lr = threshold_lr_for(cfg.sae.threshold_lr, cfg.sae.threshold_travel, total_steps)
        self.optimizer = make_optimizer(self.sae, cfg.optim, self.threshold_lr)
        self.stats = LatentStats(self.sae.d_sae, cfg.train.dead_window_tokens, cfg.train.dense_fraction, device)
        # How many of the first steps the loss on dead latents acts in: JumpReLU's pre-activation loss
        # stops after sae.pre_act_until_fraction of the run; TopK's AuxK acts throughout.
        self.dead_loss_steps = (math.ceil(cfg.sae.pre_act_until_fraction * total_steps)
                                if getattr(self.sae, "pre_act_coeff", 0.0) > 0 else total_steps)
        self.log: MetricsLog | None = None
        self.resampled = 0       # latents resampled so far (train/resample.py)
        self._reset_sums()

    def _reset_sums(self):
        self.losses, self.sums, self.n = [], {}, 0

    def step(self, x: torch.Tensor, step: int, variance: torch.Tensor, track_latents: bool = True) -> None:
        lam = lambda_at(step, self.cfg.sae.sparsity_coeff, self.cfg.optim)
        lr = lr_at(step, self.total_steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if step == 0:
            self.sae.initialise_from_batch(x, self.cfg.sae)
        dead = self.stats.dead_mask() if self.sae.uses_dead_mask and step < self.dead_loss_steps else None
        out = self.sae.training_loss(x, lam, self.backend, want_firings=track_latents, dead=dead)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.sae.unit_norm_decoder:
            remove_parallel_grad(self.sae.W_dec)
        if self.cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.optim.grad_clip_norm)
        self.optimizer.step()
        if self.sae.unit_norm_decoder:
            renormalise_rows(self.sae.W_dec)
        self.sae.after_step()
        if track_latents and out.firings is not None:
            self.stats.update(out.firings, x.shape[0])
        if resampling_due(step, self.total_steps, self.cfg.optim):
            self.resampled += resample_dead_latents(self.sae, self.optimizer, x, self.stats,
                                                    self.cfg.optim.resample_encoder_scale,
                                                    seed=int(self.cfg.train.seed) * 1_000_003 + step)
        loss = out.loss.detach()
        self.losses.append(loss)
        for k, v in (("loss", loss), ("mse", out.mse), ("fvu", out.mse / variance), ("l0", out.l0)):
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.lr, self.lam = lr, lam

    def first_nonfinite(self, first_step: int) -> int | None:
        """The step of the first non-finite loss since the last `pop_metrics`, or None."""
        if not self.losses:
            return None
        finite = torch.isfinite(torch.stack(self.losses)).cpu()
        if bool(finite.all()):
            return None
        return first_step + int((~finite).nonzero()[0])

    def pop_metrics(self) -> dict:
        m = {k: float(v) / self.n for k, v in self.sums.items()} if self.n else {}
        m.update(dead=self.stats.dead(), dense=self.stats.dense(), lr=self.lr, sparsity_coeff=self.lam)
        if self.cfg.optim.resample_every_steps > 0:
            m["resampled"] = self.resampled
        m["dead_fraction"] = m["dead"] / self.sae.d_sae
        threshold = getattr(self.sae, "threshold", None)
        if threshold is not None:
            t = threshold.detach().float()
            m.update(threshold_mean=float(t.mean()), threshold_median=float(t.median()),
                     threshold_min=float(t.min()), threshold_max=float(t.max()))
        self._reset_sums()
        return {k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v for k, v in m.items()}

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stats": self.stats.state_dict(), "resampled": self.resampled}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stats.load_state_dict(state["stats"])
        self.resampled = state.get("resampled", 0)

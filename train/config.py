"""Config schemas of stage 2, registered in Hydra's ConfigStore: a typo anywhere fails before any work.

conf/train.yaml names `train_schema` first in its defaults, then the groups `sae` (conf/sae/*.yaml)
and `sweep` (conf/sweep/*.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SAEConfig:
    architecture: str = "jumprelu"        # jumprelu | relu | topk | batchtopk | gated
    width: int = 0                        # d_sae; 0 means expansion * d_in
    expansion: int = 8
    sparsity_coeff: float = 1e-3          # lambda, in the normalised space (E||x||^2 = 1)
    # jumprelu: l0 (the paper) | quadratic (Gemma Scope 2, toward target_l0) | l1 (ablation) | tanh (Anthropic)
    sparsity_loss: str = "l0"
    bandwidth: float = 1e-3               # STE bandwidth eps
    theta_init: float = 1e-3
    # > 0: thresholds set from the first batch instead, so that each latent fires on this fraction of it
    theta_init_quantile: float = 0.0
    theta_parametrisation: str = "raw"    # raw (clamped at theta_min after each step) | log
    theta_min: float = 1e-6
    # jumprelu: the threshold parameter's own learning rate (same warm-up and decay as optim.lr; 0: optim.lr).
    # With log thresholds Adam then changes each threshold by about this fraction per step at any base lr.
    threshold_lr: float = 0.0
    # With threshold_lr > 0: it is raised to at least threshold_travel / total steps, so that a short
    # run's log thresholds can still travel a factor of e^threshold_travel (train/optim.py).
    threshold_travel: float = 8.0
    target_l0: float = 0.0                # jumprelu quadratic: the target L0
    tanh_scale: float = 4.0               # jumprelu tanh: c in tanh(c f)
    # The activations c applies to: rms, the normalised space's (E||x||^2 = 1); sqrt_d, data scaled to
    # E||x||^2 = d_in (Anthropic's convention), so that c sqrt(d_in) is used on the normalised space.
    tanh_scale_unit: str = "rms"
    ste_to_input: bool = False            # jumprelu: the straight-through gradient also reaches pre (Anthropic)
    pre_act_coeff: float = 0.0            # jumprelu: pre-activation loss on dead latents (Anthropic; 0: off)
    # ...only in this first fraction of the steps (1: all). At large lambda, with the lr decaying at the
    # end, L0 climbs there where the loss has acted; stopped at half the run it does not (README, round 20).
    pre_act_until_fraction: float = 1.0
    frequency_coeff: float = 0.0          # jumprelu: penalty on latents firing above frequency_target (0: off)
    frequency_target: float = 0.1
    # jumprelu, batchtopk: Matryoshka prefixes as fractions of the width, e.g. [0.0625, 0.25] ([]: off)
    matryoshka_fractions: List[float] = field(default_factory=list)
    # The unit of theta_init, bandwidth and threshold_lr, and of optim.bias_lr_scale (and, squared, of
    # optim.grad_clip_norm): `rms`, the normalised space's (E||x||^2 = 1); `median_norm`, the median
    # token norm there, measured on a sample of the cache (where a few large tokens carry the mean norm
    # the typical token, and its features, are smaller, and so are the constants); `sqrt_d`, data scaled
    # to E||x||^2 = d_in (Anthropic's convention: a constant c is c / sqrt(d_in) here);
    # `sqrt_d_median_norm`, both (train/member.py).
    constants_unit: str = "rms"
    b_dec_init: str = "zeros"             # zeros | mean (of the first batch)
    b_dec_to_input: bool = False          # jumprelu: encode x - b_dec (SAELens); saved folded into b_enc
    # 0: decoder rows kept at unit norm after every step (the papers'); > 0: rows (and W_enc = W_dec^T)
    # start at this norm and are left free (SAELens: 0.1); the saved SAE has the norms folded into the
    # encoder (unit-norm rows, the same outputs). jumprelu with sparsity_loss l0 or quadratic only.
    decoder_norm: float = 0.0
    # jumprelu (l0, quadratic): the threshold gradient's kernel-density sums pooled over the last
    # threshold_grad_pool_steps steps: none | window | ema (train/sae/threshold_pool.py)
    threshold_grad_pool: str = "none"
    threshold_grad_pool_steps: int = 1
    k: float = 32                         # topk (an integer), batchtopk (a mean over the batch)
    aux_k: int = 0                        # topk, batchtopk: AuxK latents among the dead ones (0: off; Gao et al.: 512)
    aux_coeff: float = 0.03125            # weight of the AuxK loss (1/32)
    threshold_momentum: float = 0.01      # batchtopk: running mean of the smallest kept value (inference threshold)


@dataclass
class OptimConfig:
    lr: float = 7e-5
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-8
    lr_warmup_steps: int = 1000           # cosine warm-up from lr_warmup_start * lr to lr
    lr_warmup_start: float = 0.1
    lr_decay_fraction: float = 0.0        # linear decay to 0 over this last fraction of steps (0: none)
    lambda_warmup_steps: int = 10000      # lambda ramped linearly from 0
    grad_clip_norm: float = 0.0           # clip the gradient's global norm to this before each step (0: off)
    # > 0: every this many steps the latents dead for train.dead_window_tokens are re-initialised toward
    # inputs the SAE reconstructs worst, and their Adam moments reset (Anthropic 2023; train/resample.py)
    resample_every_steps: int = 0
    resample_until_fraction: float = 0.5  # ...only in this first fraction of the steps, so that the last ones train
    resample_encoder_scale: float = 0.2   # a resampled encoder column's norm, as a multiple of the live ones' mean
    bias_lr_scale: float = 1.0            # the biases' lr (b_enc, b_dec, ...) as a multiple of lr: Adam moves a bias
                                          # ~lr per step in units of the data (E||x||^2 = 1); a trainer on raw
                                          # activations of norm s moves them 1/s as far


@dataclass
class LoaderConfig:
    batch_size: int = 4096                # tokens per step
    buffer_tokens: float = 1048576        # shuffle buffer (tokens); host memory: two such windows (read-ahead)
    num_readers: int = 0                  # chunk reader threads; 0: one per usable core (at most 16)
    seed: int = 0                         # chunk order and shuffling; a new order each epoch
    heldout_fraction: float = 0.01        # of sequences, never served for training (evaluation's)
    heldout_seed: int = 0
    require_complete: bool = False        # refuse a cache with incomplete chunks instead of using the rest


@dataclass
class LoopConfig:
    total_tokens: float = 4e9             # Gemma Scope's budget for 16k-wide SAEs (float: 1e8 works)
    seed: int = 0                         # parameter initialisation
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    checkpoint_every_steps: int = 5000    # 0: only at the end
    max_steps_this_run: int = 0           # stop (with a checkpoint) after this many steps; rerun to resume
    resume: bool = True                   # continue from RUN's checkpoint when there is one
    log_every_steps: int = 100
    dead_window_tokens: float = 1e7       # a latent is dead with no activation in this many tokens
    dense_fraction: float = 0.1           # ...dense when active on more than this fraction of them
    latent_stats_every: int = 1           # steps between dead/dense updates (free with the kernels' firing counts)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class SweepConfig:
    # grid: nested dict of lists, e.g. {sae: {sparsity_coeff: [1e-4, 1e-3]}}; members = its product
    grid: Dict[str, Any] = field(default_factory=dict)
    # members: list of dicts of overrides ({preset: topk, sae: {k: 64}}); crossed with the grid
    members: List[Any] = field(default_factory=list)
    shard: int = 0                        # this process trains members i with i % num_shards == shard
    num_shards: int = 1


@dataclass
class Config:
    cache: str = MISSING
    layer: int = MISSING
    sublayer: str = MISSING
    run_dir: str = MISSING
    kernel_backend: str = "auto"          # passed as backend= to kernels.jumprelu_sae
    sae: SAEConfig = field(default_factory=SAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=Config)
    cs.store(group="sae", name="sae_schema", node=SAEConfig)
    cs.store(group="sweep", name="sweep_schema", node=SweepConfig)


register()

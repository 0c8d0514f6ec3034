"""JumpReLU SAEs (shared/DESIGN.md, "The SAE"): f = pre * H(pre - theta), thresholds trained through
straight-through estimators (STE), with the sparsity losses of the papers and the peers:

- `l0` (the JumpReLU paper, Gemma Scope): lambda * mean_b sum_i H(pre_bi - theta_i);
- `quadratic` (Gemma Scope 2): lambda * mean_b (2 / T) (L0_b - T)^2, a penalty toward the target
  L0 T = `target_l0` through the same STE (per-token coefficient);
- `l1`: lambda * mean_b sum_i f_bi (the ablation's L1 arm);
- `tanh` (Anthropic): lambda * mean_b sum_i tanh(c f_bi |W_dec_i|), c = `tanh_scale` (|W_dec_i| = 1 unless
  `decoder_norm` leaves the rows free).

`l0` and `quadratic` go through `kernels.jumprelu_sae` (Triton on CUDA); `l1` and `tanh` through
autograd with `JumpReLUFunction`. Options, any loss:
- `ste_to_input` (Anthropic): the STE also passes gradient to the pre-activations;
- `pre_act_coeff` (Anthropic, on dead latents only as SAELens does): + coeff * mean_b sum_{i dead}
  relu(theta_i - pre_bi) |W_dec_i|, pulling latents that never fire toward their thresholds;
- `frequency_coeff`, `frequency_target` (a penalty on latents that fire too often, in the spirit of
  Gemma Scope 2's; its exact form is not published: ours is coeff * sum_i relu(p_i - target)^2 with
  p_i the latent's firing rate in the batch, through the STE);
- `matryoshka_widths` (Gemma Scope 2): the reconstruction loss is the mean over nested prefixes of
  the dictionary (each width's own reconstruction, the full width last), so the first latents learn
  the most general features; trained through autograd.
Thresholds are `raw` (clamped at theta_min after each step) or `log` (theta = exp(s)). The threshold
gradient's kernel-density sums can be pooled over the last steps (`threshold_grad_pool`, `l0` and
`quadratic` losses: train/sae/threshold_pool.py).
"""
from __future__ import annotations

import torch
from torch import nn

import kernels

from .base import SparseAutoencoder, StepOutput, matryoshka_mse
from .threshold_pool import ThresholdGradPool

SPARSITY_LOSSES = ("l0", "quadratic", "l1", "tanh")


class JumpReLUFunction(torch.autograd.Function):
    """f = pre * H(pre - theta) with the straight-through threshold gradient (and, with ste_to_input,
    the same term toward pre)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float, ste_to_input: bool = False):
        active = pre > theta
        ctx.save_for_backward(pre, theta, active)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre * active

    @staticmethod
    def backward(ctx, g):
        pre, theta, active = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - theta) / eps).abs() < 0.5
        ste = (theta / eps) * window * g
        dpre = g * active + ste if ctx.ste_to_input else g * active
        return dpre, -ste.sum(0), None, None


class StepFunction(torch.autograd.Function):
    """H(pre - theta) with the straight-through estimator: d/dtheta = -K/eps (and +K/eps toward pre
    with ste_to_input). The L0 count of the autograd path (Matryoshka with an L0-type loss)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float, ste_to_input: bool = False):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = (((pre - theta) / eps).abs() < 0.5) * g / eps
        return (ste if ctx.ste_to_input else None), -ste.sum(0), None, None


def quadratic_l0_penalty(l0_tokens: torch.Tensor, target: float) -> torch.Tensor:
    """Gemma Scope 2's per-token penalty toward a target L0, averaged over the batch."""
    return (2.0 / target * (l0_tokens - target).pow(2)).mean()


def frequency_penalty(fire_counts: torch.Tensor, batch: int, target: float) -> torch.Tensor:
    return torch.relu(fire_counts / batch - target).pow(2).sum()


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    scaled_by_normalisation = ("b_enc", "b_dec", "threshold")

    def __init__(self, d_in, d_sae, generator=None, theta_init: float = 1e-3, bandwidth: float = 1e-3,
                 sparsity_loss: str = "l0", theta_parametrisation: str = "raw", theta_min: float = 1e-6,
                 target_l0: float = 0.0, tanh_scale: float = 4.0, ste_to_input: bool = False,
                 pre_act_coeff: float = 0.0, frequency_coeff: float = 0.0, frequency_target: float = 0.1,
                 matryoshka_widths=(), threshold_grad_pool: str = "none", threshold_grad_pool_steps: int = 1,
                 b_dec_to_input: bool = False):
        super().__init__(d_in, d_sae, generator)
        if sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(f"jumprelu sparsity_loss must be one of {', '.join(SPARSITY_LOSSES)}, "
                             f"got {sparsity_loss!r}")
        if theta_parametrisation not in ("raw", "log"):
            raise ValueError(f"theta_parametrisation must be raw or log, got {theta_parametrisation!r}")
        if sparsity_loss == "quadratic" and not target_l0 > 0:
            raise ValueError("sparsity_loss=quadratic needs target_l0 > 0")
        self.bandwidth, self.sparsity_loss, self.theta_min = float(bandwidth), sparsity_loss, float(theta_min)
        self.theta_parametrisation = theta_parametrisation
        self.target_l0, self.tanh_scale, self.ste_to_input = float(target_l0), float(tanh_scale), bool(ste_to_input)
        self.pre_act_coeff, self.theta_init = float(pre_act_coeff), float(theta_init)
        self.b_dec_to_input = bool(b_dec_to_input)
        self.frequency_coeff, self.frequency_target = float(frequency_coeff), float(frequency_target)
        self.matryoshka_widths = self.check_widths(matryoshka_widths)
        if threshold_grad_pool != "none" and (sparsity_loss not in ("l0", "quadratic") or self.matryoshka_widths):
            raise ValueError("threshold_grad_pool needs sparsity_loss l0 or quadratic without Matryoshka prefixes "
                             "(the losses whose threshold gradient goes through the kernels)")
        self.threshold_pool = (ThresholdGradPool(threshold_grad_pool, threshold_grad_pool_steps, self.d_sae)
                               if threshold_grad_pool != "none" else None)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        theta = self._stored_threshold(torch.full((self.d_sae,), float(theta_init)))
        if theta_parametrisation == "raw":
            self.raw_threshold = nn.Parameter(theta)
        else:
            self.log_threshold = nn.Parameter(theta)

    @property
    def threshold(self) -> torch.Tensor:
        return self.raw_threshold if self.theta_parametrisation == "raw" else self.log_threshold.exp()

    def can_free_decoder(self):
        # tanh and the pre-activation loss see each latent's code times |W_dec_i| (Anthropic's and
        # SAELens's form), which the fold into unit-norm rows leaves unchanged
        return self.sparsity_loss in ("l0", "quadratic", "tanh")

    def _row_norms(self) -> torch.Tensor | None:
        """|W_dec_i| where the decoder's rows are free; None where they have unit norm."""
        return None if self.unit_norm_decoder else self.W_dec.norm(dim=1)

    def threshold_parameters(self):
        return [self.raw_threshold if self.theta_parametrisation == "raw" else self.log_threshold]

    @property
    def uses_dead_mask(self) -> bool:
        return self.pre_act_coeff > 0

    def _stored_threshold(self, theta: torch.Tensor) -> torch.Tensor:
        """Thresholds as the parameter holds them (raw_threshold, or log_threshold)."""
        return theta if self.theta_parametrisation == "raw" else theta.log()

    def _reset_value(self, name):
        if name in ("raw_threshold", "log_threshold"):
            return self._stored_threshold(torch.tensor(self.theta_init))
        return 0.0

    @torch.no_grad()
    def reinitialise_latents(self, idx, inputs, encoder_scale, alive):
        """As every family's, the thresholds back at theta_init, and the pooled threshold-gradient sums of
        these latents emptied (their pooled means count zeros for the next K steps)."""
        super().reinitialise_latents(idx, inputs, encoder_scale, alive)
        if self.threshold_pool is not None:
            self.threshold_pool.near_df[:, idx] = 0
            self.threshold_pool.near_coef[:, idx] = 0

    @torch.no_grad()
    def initialise_from_batch(self, x, cfg) -> None:
        """theta_init_quantile q > 0: each threshold at the (1 - q) quantile of its latent's
        pre-activations on the first batch (the scale of the data, not a constant)."""
        super().initialise_from_batch(x, cfg)
        q = float(getattr(cfg, "theta_init_quantile", 0.0))
        if q > 0:
            pre = x @ self.W_enc + self.b_enc
            theta = torch.quantile(pre.float(), 1.0 - q, dim=0).clamp_min(max(self.theta_min, 1e-6))
            self.threshold_parameters()[0].copy_(self._stored_threshold(theta))

    @property
    def encoder_bias(self) -> torch.Tensor:
        """b_enc, or with b_dec_to_input the bias of encoding x - b_dec: b_enc - b_dec W_enc (in the graph,
        so the kernels' b_enc gradient reaches b_dec and W_enc through it)."""
        return self.b_enc - self.b_dec @ self.W_enc if self.b_dec_to_input else self.b_enc

    def encode(self, x):
        pre = x @ self.W_enc + self.encoder_bias
        return pre * (pre > self.threshold)

    def training_loss(self, x, sparsity_coeff, backend, want_firings=True, dead=None):
        if self.sparsity_loss in ("l0", "quadratic") and not self.matryoshka_widths:
            out = self._kernel_loss(x, sparsity_coeff, backend)
        else:
            out = self._autograd_loss(x, sparsity_coeff)
        loss, mse, l0, firings = out
        if self.pre_act_coeff > 0 and dead is not None and bool(dead.any()):
            idx = dead.nonzero().squeeze(1)
            pre_dead = x @ self.W_enc[:, idx] + self.encoder_bias[idx]
            gap = torch.relu(self.threshold[idx] - pre_dead)
            norms = self._row_norms()
            if norms is not None:
                gap = gap * norms[idx]
            loss = loss + self.pre_act_coeff * gap.sum(-1).mean()
        return StepOutput(loss, mse, l0, firings)

    def _sparsity(self, lam, l0_tokens, fire_counts, batch):
        """The loss terms that are functions of the STE counts (L0 per token, firings per latent)."""
        penalty = 0.0
        if self.sparsity_loss == "quadratic":
            penalty = lam * quadratic_l0_penalty(l0_tokens, self.target_l0)
        if self.frequency_coeff > 0:
            penalty = penalty + self.frequency_coeff * frequency_penalty(fire_counts, batch, self.frequency_target)
        return penalty

    def _kernel_loss(self, x, lam, backend):
        l0_loss = self.sparsity_loss == "l0"
        out = kernels.jumprelu_sae(x, self.W_enc, self.encoder_bias, self.threshold, self.W_dec, self.b_dec,
                                   bandwidth=self.bandwidth, sparsity_coeff=lam if l0_loss else 0.0,
                                   backend=backend, ste_to_input=self.ste_to_input,
                                   threshold_pool=self.threshold_pool)
        loss = (out.loss if l0_loss else out.mse) + self._sparsity(lam, out.l0_tokens, out.fire_counts, x.shape[0])
        return loss, out.mse.detach(), out.l0.detach(), out.firings

    def _autograd_loss(self, x, lam):
        pre = x @ self.W_enc + self.encoder_bias
        theta = self.threshold
        f = JumpReLUFunction.apply(pre, theta, self.bandwidth, self.ste_to_input)
        if self.matryoshka_widths:
            mse = matryoshka_mse(x, f, self.W_dec, self.b_dec, self.matryoshka_widths)
        else:
            mse = self._mse(x, self.decode(f))
        active = (pre > theta).detach()
        if self.sparsity_loss in ("l0", "quadratic") or self.frequency_coeff > 0:
            steps = StepFunction.apply(pre, theta, self.bandwidth, self.ste_to_input)
            l0_tokens, fire_counts = steps.sum(-1), steps.sum(0)
        if self.sparsity_loss == "l0":
            penalty = lam * l0_tokens.mean()
        elif self.sparsity_loss == "l1":
            # f >= theta > 0 where active: L1 = sum f, whose derivative is 1 also at inactive latents
            # (abs() would give 0 there and drop the L1 term from the threshold's STE gradient)
            penalty = lam * f.sum(-1).mean()
        elif self.sparsity_loss == "tanh":
            norms = self._row_norms()
            code = f if norms is None else f * norms
            penalty = lam * torch.tanh(self.tanh_scale * code).sum(-1).mean()
        else:
            penalty = 0.0
        if self.sparsity_loss == "quadratic" or self.frequency_coeff > 0:
            penalty = penalty + self._sparsity(lam, l0_tokens, fire_counts, x.shape[0])
        report_mse = mse if not self.matryoshka_widths else self._mse(x, self.decode(f)).detach()
        return (mse + penalty, report_mse.detach(), active.sum(-1, dtype=x.dtype).mean(), active.sum(0))

    def after_step(self):
        if self.theta_parametrisation == "raw":
            with torch.no_grad():
                self.raw_threshold.clamp_(min=self.theta_min)

    def hyperparameters(self):
        return {"bandwidth": self.bandwidth, "sparsity_loss": self.sparsity_loss,
                "theta_parametrisation": self.theta_parametrisation}

    def export_tensors(self):
        W_enc, W_dec, b_enc, threshold = (self.W_enc.detach(), self.W_dec.detach(), self.encoder_bias.detach(),
                                          self.threshold.detach())
        if not self.unit_norm_decoder:
            # the same SAE with unit-norm rows: latent i's pre-activation, threshold and code times |W_dec_i|
            n = W_dec.norm(dim=1)
            W_enc, W_dec, b_enc, threshold = W_enc * n, W_dec / n[:, None], b_enc * n, threshold * n
        return {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": self.b_dec.detach(), "threshold": threshold}

    @classmethod
    def from_tensors(cls, W_enc, W_dec, b_enc, b_dec, threshold, **hyper):
        """A JumpReLU SAE from raw tensors (e.g. Gemma Scope's params.npz): f = pre * (pre > threshold)."""
        hyper.pop("theta_parametrisation", None)
        t = lambda a: torch.as_tensor(a, dtype=torch.float32)
        sae = cls(t(W_enc).shape[0], t(W_enc).shape[1], theta_parametrisation="raw", theta_min=0.0, **hyper)
        with torch.no_grad():
            for name, value in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec),
                                ("raw_threshold", threshold)):
                getattr(sae, name).copy_(t(value))
        return sae

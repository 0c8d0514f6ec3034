"""JumpReLU SAEs (shared/DESIGN.md, "The SAE"): f = pre * H(pre - theta), thresholds trained through
straight-through estimators."""
from __future__ import annotations

import torch
from torch import nn

import kernels

from .base import SparseAutoencoder, StepOutput


class JumpReLUFunction(torch.autograd.Function):
    """f = pre * H(pre - theta) with the straight-through threshold gradient (used for the L1 variant;
    the L0 loss goes through kernels.jumprelu_sae)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float):
        active = pre > theta
        ctx.save_for_backward(pre, theta, active)
        ctx.bandwidth = bandwidth
        return pre * active

    @staticmethod
    def backward(ctx, g):
        pre, theta, active = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - theta) / eps).abs() < 0.5
        dtheta = -(theta / eps) * (window * g).sum(0)
        return g * active, dtheta, None


class JumpReLUSAE(SparseAutoencoder):
    architecture = "jumprelu"
    scaled_by_normalisation = ("b_enc", "b_dec", "threshold")

    def __init__(self, d_in, d_sae, generator=None, theta_init: float = 1e-3, bandwidth: float = 1e-3,
                 sparsity_loss: str = "l0", theta_parametrisation: str = "raw", theta_min: float = 1e-6):
        super().__init__(d_in, d_sae, generator)
        if sparsity_loss not in ("l0", "l1"):
            raise ValueError(f"jumprelu sparsity_loss must be l0 or l1, got {sparsity_loss!r}")
        if theta_parametrisation not in ("raw", "log"):
            raise ValueError(f"theta_parametrisation must be raw or log, got {theta_parametrisation!r}")
        self.bandwidth, self.sparsity_loss, self.theta_min = float(bandwidth), sparsity_loss, float(theta_min)
        self.theta_parametrisation = theta_parametrisation
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        theta = torch.full((self.d_sae,), float(theta_init))
        if theta_parametrisation == "raw":
            self.raw_threshold = nn.Parameter(theta)
        else:
            self.log_threshold = nn.Parameter(theta.log())

    @property
    def threshold(self) -> torch.Tensor:
        return self.raw_threshold if self.theta_parametrisation == "raw" else self.log_threshold.exp()

    def encode(self, x):
        pre = x @ self.W_enc + self.b_enc
        return pre * (pre > self.threshold)

    def training_loss(self, x, sparsity_coeff, backend, want_firings=True, dead=None):
        if self.sparsity_loss == "l0":
            out = kernels.jumprelu_sae(x, self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec,
                                       bandwidth=self.bandwidth, sparsity_coeff=sparsity_coeff, backend=backend)
            firings = out.firings
            if firings is None and want_firings:   # a backend that does not count them: one more GEMM
                with torch.no_grad():
                    firings = ((x @ self.W_enc + self.b_enc) > self.threshold).sum(0)
            return StepOutput(out.loss, out.mse.detach(), out.l0.detach(), firings)
        pre = x @ self.W_enc + self.b_enc
        f = JumpReLUFunction.apply(pre, self.threshold, self.bandwidth)
        mse = self._mse(x, self.decode(f))
        active = (f > 0).detach()
        # f >= theta > 0 where active: L1 = sum f, whose derivative is 1 also at inactive latents (abs()
        # would give 0 there and drop the L1 term from the threshold's straight-through gradient)
        loss = mse + sparsity_coeff * f.sum(-1).mean()
        return StepOutput(loss, mse.detach(), active.sum(-1, dtype=x.dtype).mean(), active.sum(0))

    def after_step(self):
        if self.theta_parametrisation == "raw":
            with torch.no_grad():
                self.raw_threshold.clamp_(min=self.theta_min)

    def hyperparameters(self):
        return {"bandwidth": self.bandwidth, "sparsity_loss": self.sparsity_loss,
                "theta_parametrisation": self.theta_parametrisation}

    def export_tensors(self):
        return {"W_enc": self.W_enc.detach(), "W_dec": self.W_dec.detach(), "b_enc": self.b_enc.detach(),
                "b_dec": self.b_dec.detach(), "threshold": self.threshold.detach()}

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

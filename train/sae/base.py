"""Sparse autoencoders: JumpReLU (shared/DESIGN.md, "The SAE") and the baselines ReLU+L1, TopK, Gated.

All share the decoder x_hat = f W_dec + b_dec with unit-norm rows of W_dec, and the initialisation
W_dec He-uniform with rows normalised, W_enc = W_dec^T, biases 0. During training they work in the
normalised space (x / c, E||x||^2 = 1); `folded(c)` returns the same SAE in raw activation units,
which is what run folders store and `load_sae` returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels


@dataclass
class StepOutput:
    loss: torch.Tensor        # what the optimizer minimises
    mse: torch.Tensor         # mean over the batch of ||x - x_hat||^2
    l0: torch.Tensor          # mean number of active latents per token (no gradient)
    firings: torch.Tensor | None  # int64 [d_sae]: tokens of the batch on which each latent fired


def decoder_init(d_sae: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    W = torch.empty(d_sae, d_in)
    bound = (6.0 / d_in) ** 0.5   # He-uniform; only the direction survives the row normalisation
    W.uniform_(-bound, bound, generator=generator)
    return W / W.norm(dim=1, keepdim=True)


class SparseAutoencoder(nn.Module):
    architecture = ""
    scaled_by_normalisation: tuple[str, ...] = ()   # tensors multiplied by c when folding

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None):
        super().__init__()
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        W_dec = decoder_init(self.d_sae, self.d_in, generator or torch.Generator().manual_seed(0))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def training_loss(self, x, sparsity_coeff: float, backend: str, want_firings: bool = True,
                      dead: torch.Tensor | None = None) -> StepOutput:
        """dead: bool [d_sae], latents dead so far (only TopK's AuxK uses it)."""
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        """Constructor arguments beyond d_in, d_sae that inference needs (recorded in sae.json)."""
        return {}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The canonical tensors of sae.safetensors (in this module's units)."""
        return {k: v.detach() for k, v in self.named_parameters()}

    @classmethod
    def from_tensors(cls, **kw):
        tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        hyper = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
        d_in, d_sae = tensors["W_dec"].shape[1], tensors["W_dec"].shape[0]
        sae = cls(d_in, d_sae, **hyper)
        with torch.no_grad():
            for name, t in tensors.items():
                getattr(sae, name).copy_(t.to(torch.float32))
        return sae

    def folded(self, c: float) -> "SparseAutoencoder":
        """This SAE in raw units: inputs x_raw = c x give outputs c x_hat, codes c f."""
        tensors = {k: (v * c if k in self.scaled_by_normalisation else v).clone()
                   for k, v in self.export_tensors().items()}
        return type(self).from_tensors(**tensors, **self.hyperparameters())

    def after_step(self) -> None:
        """Parameter constraints applied after each optimizer step (beyond the decoder norms)."""

    @staticmethod
    def _mse(x, x_hat):
        return (x_hat - x).pow(2).sum(-1).mean()


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


class ReLUSAE(SparseAutoencoder):
    """The vanilla SAE: f = relu(x W_enc + b_enc), L1 penalty (decoder rows have unit norm)."""
    architecture = "relu"
    scaled_by_normalisation = ("b_enc", "b_dec")

    def __init__(self, d_in, d_sae, generator=None):
        super().__init__(d_in, d_sae, generator)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def training_loss(self, x, sparsity_coeff, backend, want_firings=True, dead=None):
        f = self.encode(x)
        mse = self._mse(x, self.decode(f))
        active = (f > 0).detach()
        loss = mse + sparsity_coeff * f.sum(-1).mean()
        return StepOutput(loss, mse.detach(), active.sum(-1, dtype=x.dtype).mean(), active.sum(0))


class TopKSAE(SparseAutoencoder):
    """f keeps the k largest pre-activations of each token (after ReLU); no sparsity penalty.

    AuxK (Gao et al. 2024), when aux_k > 0: the aux_k largest pre-activations among dead latents
    reconstruct the main residual through the decoder (without b_dec); aux_coeff times that MSE joins
    the loss, so dead latents get gradient."""
    architecture = "topk"
    scaled_by_normalisation = ("b_enc", "b_dec")

    def __init__(self, d_in, d_sae, generator=None, k: int = 32, aux_k: int = 0, aux_coeff: float = 1 / 32):
        super().__init__(d_in, d_sae, generator)
        if not 0 < k <= d_sae:
            raise ValueError(f"topk k must be in [1, d_sae={d_sae}], got {k}")
        self.k, self.aux_k, self.aux_coeff = int(k), int(aux_k), float(aux_coeff)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))

    @staticmethod
    def _top(pre, k):
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x):
        return self._top(x @ self.W_enc + self.b_enc, self.k)

    def training_loss(self, x, sparsity_coeff, backend, want_firings=True, dead=None):
        pre = x @ self.W_enc + self.b_enc
        f = self._top(pre, self.k)
        x_hat = self.decode(f)
        mse = self._mse(x, x_hat)
        loss = mse
        n_dead = 0 if dead is None else int(dead.sum())
        if self.aux_k > 0 and n_dead > 0:
            z = self._top(pre.masked_fill(~dead, float("-inf")), min(self.aux_k, n_dead))
            loss = mse + self.aux_coeff * self._mse((x - x_hat).detach(), z @ self.W_dec)
        active = (f > 0).detach()
        return StepOutput(loss, mse.detach(), active.sum(-1, dtype=x.dtype).mean(), active.sum(0))

    def hyperparameters(self):
        return {"k": self.k}


class GatedSAE(SparseAutoencoder):
    """Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire, a magnitude path
    sharing its directions (W_mag = W_gate * exp(r_mag)) sets their values. Inputs are centred by b_dec.
    Loss: mse + lambda * L1(relu(pi_gate)) + the auxiliary reconstruction from relu(pi_gate) through a
    frozen decoder."""
    architecture = "gated"
    scaled_by_normalisation = ("b_gate", "b_mag", "b_dec")

    def __init__(self, d_in, d_sae, generator=None):
        super().__init__(d_in, d_sae, generator)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())   # the gate directions
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    def _paths(self, x):
        xc = x - self.b_dec
        pi_gate = xc @ self.W_enc + self.b_gate
        pi_mag = xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x):
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0) * torch.relu(pi_mag)

    def training_loss(self, x, sparsity_coeff, backend, want_firings=True, dead=None):
        pi_gate, pi_mag = self._paths(x)
        f = (pi_gate > 0) * torch.relu(pi_mag)
        mse = self._mse(x, self.decode(f))
        gate = torch.relu(pi_gate)
        aux = self._mse(x, gate @ self.W_dec.detach() + self.b_dec.detach())
        loss = mse + sparsity_coeff * gate.sum(-1).mean() + aux
        active = (f > 0).detach()
        return StepOutput(loss, mse.detach(), active.sum(-1, dtype=x.dtype).mean(), active.sum(0))


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

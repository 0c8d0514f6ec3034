"""What every SAE family shares: the decoder x_hat = f W_dec + b_dec with unit-norm rows of W_dec, its
initialisation (W_dec He-uniform with rows normalised; the families set W_enc = W_dec^T, biases 0),
folding the input normalisation into the weights, and the shape of a training step's output.

During training SAEs work in the normalised space (x / c, E||x||^2 = 1); `folded(c)` returns the same
SAE in raw activation units, which is what run folders store and `load_sae` returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepOutput:
    loss: torch.Tensor        # what the optimizer minimises
    mse: torch.Tensor         # mean over the batch of ||x - x_hat||^2
    l0: torch.Tensor          # mean number of active latents per token (no gradient)
    firings: torch.Tensor | None  # int64 [d_sae]: tokens of the batch on which each latent fired


def matryoshka_mse(x: torch.Tensor, f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                   widths: tuple[int, ...]) -> torch.Tensor:
    """Mean over nested prefixes of the dictionary of the reconstruction error of each prefix alone
    (Matryoshka SAEs, Bussmann et al. 2025; Gemma Scope 2). `widths` ascend and end at d_sae; the
    partial reconstructions are accumulated prefix by prefix, so the cost is one decode."""
    total, x_hat, start = 0.0, b_dec.expand_as(x), 0
    for w in widths:
        x_hat = x_hat + f[:, start:w] @ W_dec[start:w]
        total = total + (x_hat - x).pow(2).sum(-1).mean()
        start = w
    return total / len(widths)


def decoder_init(d_sae: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    W = torch.empty(d_sae, d_in)
    bound = (6.0 / d_in) ** 0.5   # He-uniform; only the direction survives the row normalisation
    W.uniform_(-bound, bound, generator=generator)
    return W / W.norm(dim=1, keepdim=True)


class SparseAutoencoder(nn.Module):
    architecture = ""
    unit_norm_decoder = True     # the trainer projects W_dec's rows back to unit norm after every step
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

    def check_widths(self, widths) -> tuple[int, ...]:
        """Matryoshka prefix widths: ascending, ending at d_sae (added when missing); () for none."""
        widths = tuple(int(w) for w in widths or ())
        if not widths:
            return ()
        if widths[-1] != self.d_sae:
            widths = widths + (self.d_sae,)
        if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1 or widths[-1] > self.d_sae:
            raise ValueError(f"matryoshka_widths {list(widths)}: ascending widths in [1, d_sae={self.d_sae}]")
        return widths

    @torch.no_grad()
    def initialise_from_batch(self, x: torch.Tensor, cfg) -> None:
        """Data-dependent initialisation from the first training batch (a fresh run's step 0):
        b_dec_init=mean sets b_dec to the batch mean; families add their own (JumpReLU thresholds)."""
        if getattr(cfg, "b_dec_init", "zeros") == "mean":
            self.b_dec.copy_(x.mean(0).to(self.b_dec.dtype))

    def can_free_decoder(self) -> bool:
        """Whether the decoder rows' norms may be left free in training: the sparsity loss ignores them,
        and the trained SAE folds them into the encoder, so that it is saved with unit-norm rows."""
        return False

    @torch.no_grad()
    def free_decoder(self, norm: float) -> None:
        """Rows of W_dec (and W_enc, its transpose at initialisation) scaled to `norm` and left free."""
        if not self.can_free_decoder():
            raise ValueError(f"sae.decoder_norm > 0 leaves decoder norms free, which {self.architecture} with this "
                             "sparsity loss cannot have (its penalty or its top-k choice depends on the norms, so the "
                             "trained SAE could not be saved with unit-norm rows): use 0")
        self.W_dec.mul_(norm)
        self.W_enc.mul_(norm)
        self.unit_norm_decoder = False

    def threshold_parameters(self) -> list[nn.Parameter]:
        """Parameters that `sae.threshold_lr` gives an Adam group of their own (JumpReLU's threshold)."""
        return []

    def bias_parameters(self) -> list[nn.Parameter]:
        """Parameters in the data's units that `optim.bias_lr_scale` gives a group of their own: every
        family names its biases b_* (b_dec; b_enc; Gated's b_gate, b_mag)."""
        return [p for name, p in self.named_parameters() if name.startswith("b_")]

    def latent_axes(self) -> dict[str, int]:
        """{parameter name: its latent axis} for every parameter that holds one slice per latent (all but
        b_dec: W_enc's columns, W_dec's rows, the per-latent biases and thresholds)."""
        axes = {}
        for name, p in self.named_parameters():
            if name == "b_dec":
                continue
            axis = 1 if name == "W_enc" else 0
            if p.shape[axis] != self.d_sae:
                raise AssertionError(f"{self.architecture}.{name} {tuple(p.shape)}: no latent axis")
            axes[name] = axis
        return axes

    def _reset_value(self, name: str) -> float:
        """What a re-initialised latent's per-latent parameter `name` (not W_enc, W_dec) starts at."""
        return 0.0

    @torch.no_grad()
    def reinitialise_latents(self, idx: torch.Tensor, inputs: torch.Tensor, encoder_scale: float,
                             alive: torch.Tensor) -> None:
        """Latents `idx` re-initialised toward `inputs` (one row each; train/resample.py): decoder rows the
        unit directions of inputs - b_dec at the mean norm of the `alive` latents' rows (1 with unit-norm
        rows), encoder columns the same directions at encoder_scale times the alive columns' mean norm,
        every other per-latent parameter at its starting value (biases 0)."""
        direction = inputs.to(self.W_dec.dtype) - self.b_dec
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        dec_norm = 1.0 if self.unit_norm_decoder else self.W_dec[alive].norm(dim=1).mean()
        enc_norm = encoder_scale * self.W_enc[:, alive].norm(dim=0).mean()
        self.W_dec[idx] = direction * dec_norm
        self.W_enc[:, idx] = direction.T * enc_norm
        for name in self.latent_axes():
            if name not in ("W_enc", "W_dec"):
                self.get_parameter(name)[idx] = self._reset_value(name)

    @property
    def uses_dead_mask(self) -> bool:
        """Whether training_loss needs the dead-latent mask (AuxK, pre-activation loss)."""
        return False

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

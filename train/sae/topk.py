"""TopK SAEs (Gao et al. 2024): the k largest pre-activations of each token, no sparsity penalty; and
BatchTopK (Bussmann et al. 2024): the B*k largest of the whole batch, with Matryoshka prefixes
(Bussmann et al. 2025) as an option.

A trained BatchTopK SAE is used as a JumpReLU: f = pre * (pre > theta) with one threshold for every
latent, the running mean of the smallest value each training batch kept, so it exports as a JumpReLU
(Gemma Scope params.npz, SAELens jumprelu) and its L0 at inference tracks k on average.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SparseAutoencoder, StepOutput, matryoshka_mse


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

    @property
    def uses_dead_mask(self) -> bool:
        return self.aux_k > 0

    @staticmethod
    def _top(pre, k):
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x):
        return self._top(x @ self.W_enc + self.b_enc, self.k)

    def _aux_loss(self, pre, x, x_hat, dead):
        """AuxK: the dead latents' top aux_k pre-activations reconstruct the residual (0 when off)."""
        n_dead = 0 if dead is None else int(dead.sum())
        if self.aux_k <= 0 or n_dead == 0:
            return 0.0
        z = self._top(pre.masked_fill(~dead, float("-inf")), min(self.aux_k, n_dead))
        return self.aux_coeff * self._mse((x - x_hat).detach(), z @ self.W_dec)

    def training_loss(self, x, sparsity_coeff, backend, want_firings=True, dead=None):
        pre = x @ self.W_enc + self.b_enc
        f = self._top(pre, self.k)
        x_hat = self.decode(f)
        mse = self._mse(x, x_hat)
        loss = mse + self._aux_loss(pre, x, x_hat, dead)
        active = (f > 0).detach()
        return StepOutput(loss, mse.detach(), active.sum(-1, dtype=x.dtype).mean(), active.sum(0))

    def hyperparameters(self):
        return {"k": self.k}


class BatchTopKSAE(TopKSAE):
    """BatchTopK: the B*k largest ReLU'd pre-activations of the batch; at inference a JumpReLU with the
    learnt threshold (see the module's docstring). matryoshka_widths: the reconstruction loss is the
    mean over nested prefixes (Matryoshka-BatchTopK)."""
    architecture = "batchtopk"
    scaled_by_normalisation = ("b_enc", "b_dec", "threshold")

    def __init__(self, d_in, d_sae, generator=None, k: float = 32, aux_k: int = 0, aux_coeff: float = 1 / 32,
                 threshold_momentum: float = 0.01, matryoshka_widths=()):
        super().__init__(d_in, d_sae, generator, k=max(1, int(round(k))), aux_k=aux_k, aux_coeff=aux_coeff)
        self.k_mean = float(k)
        self.threshold_momentum = float(threshold_momentum)
        self.matryoshka_widths = self.check_widths(matryoshka_widths)
        self.register_buffer("threshold", torch.zeros(self.d_sae))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64))

    def encode(self, x):
        pre = x @ self.W_enc + self.b_enc
        return pre * (pre > self.threshold)

    def batch_top(self, pre):
        """The B * k largest ReLU'd entries of the batch, and the smallest of them."""
        flat = torch.relu(pre).flatten()
        top = flat.topk(min(flat.numel(), max(1, int(round(self.k_mean * pre.shape[0])))))
        f = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        return f, top.values[-1]

    @torch.no_grad()
    def _track_threshold(self, smallest):
        """Running mean of the smallest kept value (plain mean over the first 1/momentum steps)."""
        rate = max(self.threshold_momentum, 1.0 / float(self.threshold_steps + 1))
        self.threshold.mul_(1 - rate).add_(rate * smallest.clamp_min(0).to(self.threshold.dtype))
        self.threshold_steps += 1

    def training_loss(self, x, sparsity_coeff, backend, want_firings=True, dead=None):
        pre = x @ self.W_enc + self.b_enc
        f, smallest = self.batch_top(pre)
        self._track_threshold(smallest)
        x_hat = self.decode(f)
        if self.matryoshka_widths:
            mse_loss = matryoshka_mse(x, f, self.W_dec, self.b_dec, self.matryoshka_widths)
        else:
            mse_loss = self._mse(x, x_hat)
        loss = mse_loss + self._aux_loss(pre, x, x_hat, dead)
        active = (f > 0).detach()
        return StepOutput(loss, self._mse(x, x_hat).detach(), active.sum(-1, dtype=x.dtype).mean(), active.sum(0))

    def hyperparameters(self):
        return {"k": self.k_mean}

    def export_tensors(self):
        return {"W_enc": self.W_enc.detach(), "W_dec": self.W_dec.detach(), "b_enc": self.b_enc.detach(),
                "b_dec": self.b_dec.detach(), "threshold": self.threshold.detach()}

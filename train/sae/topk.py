"""TopK SAEs (Gao et al. 2024): the k largest pre-activations of each token, no sparsity penalty."""
from __future__ import annotations

import torch
from torch import nn

from .base import SparseAutoencoder, StepOutput


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

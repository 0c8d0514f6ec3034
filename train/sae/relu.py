"""The vanilla SAE: ReLU with an L1 penalty."""
from __future__ import annotations

import torch
from torch import nn

from .base import SparseAutoencoder, StepOutput


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

"""Gated SAEs (Rajamanoharan et al. 2024)."""
from __future__ import annotations

import torch
from torch import nn

from .base import SparseAutoencoder, StepOutput


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

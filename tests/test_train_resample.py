"""Resampling dead latents (train/resample.py) against formulas written here in float64: the
re-initialised slices of every family, Adam's reset moments, the draw and the schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from train.config import OptimConfig, SAEConfig
from train.metrics import LatentStats
from train.resample import (draw_inputs, reset_optimizer_slices, resample_dead_latents, resampling_due,
                            squared_errors)
from train.sae import build_sae

D, W = 6, 12
FAMILIES = {
    "jumprelu": dict(architecture="jumprelu", theta_init=0.05),
    "jumprelu_log_free_decoder": dict(architecture="jumprelu", theta_init=0.05, theta_parametrisation="log",
                                      decoder_norm=0.3, b_dec_to_input=True),
    "jumprelu_pooled": dict(architecture="jumprelu", theta_init=0.05, threshold_grad_pool="window",
                            threshold_grad_pool_steps=3),
    "relu": dict(architecture="relu"),
    "topk": dict(architecture="topk", k=3),
    "gated": dict(architecture="gated"),
}


def _trained_sae(family, steps=5):
    """An SAE of `family` after a few Adam steps (moments filled, parameters off their initialisation)."""
    sae = build_sae(OmegaConf.structured(SAEConfig(width=W, **FAMILIES[family])), D, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, D, generator=gen) + 0.5
        out = sae.training_loss(x, 1e-3, "reference")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():            # every per-latent parameter away from its reset value
        for name, p in sae.named_parameters():
            if name not in ("W_enc", "W_dec"):
                p.add_(0.01 * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 0.02)
    return sae, opt


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reinitialised_latents_are_the_formula_and_the_others_are_untouched(family):
    sae, _ = _trained_sae(family)
    before = {k: v.detach().double().clone() for k, v in sae.named_parameters()}
    idx = torch.tensor([1, 4, 7])
    dead = torch.zeros(W, dtype=torch.bool)
    dead[[1, 4, 7, 9]] = True                       # 9 is dead but not resampled: not in the live means
    alive = ~dead
    inputs = torch.randn(3, D, generator=torch.Generator().manual_seed(2)) * 2
    sae.reinitialise_latents(idx, inputs, 0.2, alive)

    b_dec = before["b_dec"].numpy()
    direction = inputs.double().numpy() - b_dec
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    W_dec0, W_enc0 = before["W_dec"].numpy(), before["W_enc"].numpy()
    dec_norm = 1.0 if sae.unit_norm_decoder else np.linalg.norm(W_dec0[alive.numpy()], axis=1).mean()
    enc_norm = 0.2 * np.linalg.norm(W_enc0[:, alive.numpy()], axis=0).mean()
    np.testing.assert_allclose(sae.W_dec.detach().double().numpy()[idx], direction * dec_norm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sae.W_enc.detach().double().numpy()[:, idx], direction.T * enc_norm,
                               rtol=1e-6, atol=1e-7)
    keep = torch.ones(W, dtype=torch.bool)
    keep[idx] = False
    for name, axis in sae.latent_axes().items():
        now = sae.get_parameter(name).detach().double()
        assert torch.equal(now.index_select(axis, keep.nonzero().squeeze(1)),
                           before[name].index_select(axis, keep.nonzero().squeeze(1))), name
        if name in ("W_enc", "W_dec"):
            continue
        want = {"raw_threshold": 0.05, "log_threshold": np.log(0.05)}.get(name, 0.0)
        np.testing.assert_allclose(now[idx].numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
    assert torch.equal(sae.b_dec.detach().double(), before["b_dec"])
    if family == "jumprelu_pooled":
        assert torch.all(sae.threshold_pool.near_df[:, idx] == 0) and torch.all(sae.threshold_pool.near_coef[:, idx] == 0)
    assert set(sae.latent_axes()) == {k for k in before if k != "b_dec"}


def test_adam_moments_of_resampled_slices_reset_to_zero_and_the_live_mean():
    sae, opt = _trained_sae("jumprelu_log_free_decoder")
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}
    idx = torch.tensor([0, 5])
    alive = torch.ones(W, dtype=torch.bool)
    alive[[0, 5, 6]] = False
    reset_optimizer_slices(opt, sae, idx, alive)
    for name, axis in sae.latent_axes().items():
        p = sae.get_parameter(name)
        m, v = opt.state[p]["exp_avg"].double(), opt.state[p]["exp_avg_sq"].double()
        m0, v0 = before[p]["exp_avg"].double(), before[p]["exp_avg_sq"].double()
        assert torch.all(m.index_select(axis, idx) == 0), name
        live = v0.index_select(axis, alive.nonzero().squeeze(1)).mean(axis, keepdim=True)
        for i in idx.tolist():
            torch.testing.assert_close(v.select(axis, i), live.squeeze(axis), rtol=1e-6, atol=0)
        rest = torch.tensor([i for i in range(W) if i not in idx.tolist()])
        assert torch.equal(m.index_select(axis, rest), m0.index_select(axis, rest))
        assert torch.equal(v.index_select(axis, rest), v0.index_select(axis, rest))
    b_dec = sae.b_dec
    assert torch.equal(opt.state[b_dec]["exp_avg"], before[b_dec]["exp_avg"])


def test_draw_takes_only_rows_with_error_distinct_and_reproducibly():
    weights = torch.zeros(50)
    weights[[3, 17, 40]] = torch.tensor([1.0, 5.0, 0.5])
    assert sorted(draw_inputs(weights, 8, seed=0).tolist()) == [3, 17, 40]
    two = draw_inputs(weights, 2, seed=4)
    assert len(set(two.tolist())) == 2 and set(two.tolist()) <= {3, 17, 40}
    assert torch.equal(two, draw_inputs(weights, 2, seed=4))
    assert len(draw_inputs(torch.zeros(5), 3, seed=0)) == 0
    # frequencies follow the weights: row 17 (weight 5 of 6.5) drawn first in about 77% of draws
    first = [int(draw_inputs(weights, 1, seed=s)[0]) for s in range(2000)]
    assert abs(np.mean(np.array(first) == 17) - 5 / 6.5) < 0.04


def test_squared_errors_are_the_reconstruction_error_in_float64():
    sae, _ = _trained_sae("jumprelu")
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3))
    sae64 = sae.double()
    want = ((x.double() - sae64(x.double())) ** 2).sum(-1)
    torch.testing.assert_close(squared_errors(sae64, x.double()), want, rtol=0, atol=0)
    assert torch.all(want > 0)


def test_schedule_every_k_steps_up_to_the_fraction():
    cfg = OptimConfig(resample_every_steps=4, resample_until_fraction=0.5)
    assert [s for s in range(20) if resampling_due(s, 20, cfg)] == [3, 7]
    assert not any(resampling_due(s, 20, OptimConfig()) for s in range(20))


def test_resampled_latents_are_alive_again_and_counted():
    sae, opt = _trained_sae("jumprelu")
    stats = LatentStats(W, window=64, dense_fraction=0.5, device="cpu")
    firings = torch.zeros(W, dtype=torch.int64)
    firings[:8] = 3                                    # latents 8-11 never fire
    for _ in range(3):
        stats.update(firings, 32)
    assert stats.dead_mask().nonzero().squeeze(1).tolist() == [8, 9, 10, 11]
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(5)) * 3
    assert resample_dead_latents(sae, opt, x, stats, 0.2, seed=0) == 4
    assert not stats.dead_mask().any()
    # a batch of two rows with an error resamples two of the four; the other two wait
    for _ in range(3):
        stats.update(firings, 32)
    assert resample_dead_latents(sae, opt, x[:2], stats, 0.2, seed=1) == 2
    assert stats.dead_mask().sum() == 2

"""Threshold gradients pooled across steps (train/sae/threshold_pool.py): the pool's arithmetic, both
backends handing it the same per-latent sums, window K=1 training bit-identical to none, and resumed
pooled runs bit-identical to uninterrupted ones."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import jumprelu_triton as jt
from train.sae.threshold_pool import ThresholdGradPool
from tests.test_kernels_triton import BANDWIDTH, make_problem, rel_err
from tests.test_train_loop import cache, make_cfg, weights_bytes  # noqa: F401  (the fixture)
from train.cli import run_training


def test_window_and_ema_arithmetic():
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randn(5, generator=g), torch.randn(5, generator=g)) for _ in range(7)]
    window, ema = ThresholdGradPool("window", 3, 5), ThresholdGradPool("ema", 4, 5)
    m_df, m_coef = torch.zeros(5), torch.zeros(5)
    for n, (a, c) in enumerate(samples):
        got_w, got_e = window(a, c), ema(a, c)
        last = samples[max(0, n - 2):n + 1]
        torch.testing.assert_close(got_w[0], torch.stack([s[0] for s in last]).mean(0))
        torch.testing.assert_close(got_w[1], torch.stack([s[1] for s in last]).mean(0))
        m_df, m_coef = 0.75 * m_df + 0.25 * a, 0.75 * m_coef + 0.25 * c
        torch.testing.assert_close(got_e[0], m_df / (1 - 0.75 ** (n + 1)))
        torch.testing.assert_close(got_e[1], m_coef / (1 - 0.75 ** (n + 1)))
    one = ThresholdGradPool("window", 1, 5)
    for a, c in samples:
        out = one(a, c)
        assert torch.equal(out[0], a) and torch.equal(out[1], c)    # K = 1: the identity, bit for bit


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_both_backends_pool_the_same_sums(mode):
    """A pool that records what it is given and returns something else: the Triton backward (the
    interpreter on CPU) must hand it the reference's per-latent sums and build dtheta from its answer."""
    x, params = make_problem(29, 19, 45, "mixed", "fp32", 3)
    seen = {}

    def pool(name):
        def fn(near_df, near_coef):
            seen[name] = (near_df.double().cpu(), near_coef.double().cpu())
            return 2 * near_df, near_coef + 0.5
        return fn

    grads = {}
    for name, fn, dtype, kw in (("triton", jt.jumprelu_sae_triton, torch.float32, dict(precision="fp32", mode=mode)),
                                ("reference", kernels.jumprelu_sae_reference, torch.float64, {})):
        ps = [p.detach().cpu().to(dtype).requires_grad_(True) for p in params]
        out = fn(x.cpu().to(dtype), *ps, BANDWIDTH, 0.3, threshold_pool=pool(name), **kw)
        out[0].backward()
        grads[name] = ps[2].grad
    for a, b in zip(seen["triton"], seen["reference"]):
        assert rel_err(a, b) < 2e-5
    assert seen["reference"][0].abs().max() > 0 and seen["reference"][1].abs().max() > 0
    theta = params[2].double().cpu()
    near_df, near_coef = seen["reference"]
    want = -(theta * 2 * near_df + near_coef + 0.5) / BANDWIDTH
    assert rel_err(grads["reference"], want) < 1e-12 and rel_err(grads["triton"], want) < 2e-5


def test_window_of_one_trains_bit_identically_to_none(cache, tmp_path):  # noqa: F811
    run_training(make_cfg(cache, tmp_path / "none"), single=True)
    run_training(make_cfg(cache, tmp_path / "k1", "sae.threshold_grad_pool=window",
                          "sae.threshold_grad_pool_steps=1"), single=True)
    run_training(make_cfg(cache, tmp_path / "k4", "sae.threshold_grad_pool=window",
                          "sae.threshold_grad_pool_steps=4"), single=True)
    assert weights_bytes(tmp_path / "k1") == weights_bytes(tmp_path / "none")
    assert weights_bytes(tmp_path / "k4") != weights_bytes(tmp_path / "none")   # pooling does something


@pytest.mark.parametrize("pool", ["window", "ema"])
def test_pooled_run_resumes_bit_for_bit(cache, tmp_path, pool):  # noqa: F811
    extra = [f"sae.threshold_grad_pool={pool}", "sae.threshold_grad_pool_steps=3", "train.checkpoint_every_steps=0"]
    run_training(make_cfg(cache, tmp_path / "full", *extra), single=True)
    sliced = tmp_path / "sliced"
    assert run_training(make_cfg(cache, sliced, *extra, "train.max_steps_this_run=5"), single=True) is None
    assert run_training(make_cfg(cache, sliced, *extra, "train.max_steps_this_run=50"), single=True) is not None
    assert weights_bytes(sliced) == weights_bytes(tmp_path / "full")


def test_pooling_is_refused_where_the_kernels_do_not_compute_the_threshold_gradient():
    from train.sae import JumpReLUSAE
    with pytest.raises(ValueError, match="threshold_grad_pool"):
        JumpReLUSAE(4, 8, sparsity_loss="tanh", threshold_grad_pool="ema", threshold_grad_pool_steps=4)
    with pytest.raises(ValueError, match="at least 1"):
        ThresholdGradPool("window", 0, 8)

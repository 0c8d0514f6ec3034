"""The SAE maths of shared/DESIGN.md against an independent float64 NumPy implementation."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from train.config import OptimConfig, SAEConfig
from train.member import Member
from train.members import check_member
from train.optim import lambda_at, lr_at
from train.sae import ARCHITECTURES, JumpReLUSAE, build_sae

EPS = 1e-3


def numpy_jumprelu(x, W_enc, b_enc, theta, W_dec, b_dec, eps, lam):
    """DESIGN.md's forward and STE backward, written out in float64 NumPy."""
    B = x.shape[0]
    pre = x @ W_enc + b_enc
    H = (pre > theta).astype(np.float64)
    f = pre * H
    x_hat = f @ W_dec + b_dec
    loss = np.mean(np.sum((x - x_hat) ** 2, axis=1) + lam * H.sum(1))
    g = 2 * (x_hat - x) / B
    dW_dec = f.T @ g
    db_dec = g.sum(0)
    df = g @ W_dec.T
    dpre = df * H
    K = (np.abs((pre - theta) / eps) < 0.5).astype(np.float64)
    dtheta = np.sum(-(theta / eps) * K * df - (lam / B) * (1 / eps) * K, axis=0)
    return loss, {"W_enc": x.T @ dpre, "b_enc": dpre.sum(0), "threshold": dtheta, "W_dec": dW_dec, "b_dec": db_dec}


def near_threshold_case(seed=0, B=24, d=6, W=10, lam=0.05):
    """Random parameters where several latents sit just below (and above) their thresholds."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, d))
    W_enc = rng.standard_normal((d, W)) * 0.5
    W_dec = rng.standard_normal((W, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_enc = rng.standard_normal(W) * 0.1
    b_dec = rng.standard_normal(d) * 0.1
    pre = x @ W_enc + b_enc
    theta = np.abs(rng.standard_normal(W)) * 0.3 + 0.01
    # latent 0: inactive at token 0 but within eps/2 below theta; latent 1: active just above theta
    theta[0] = pre[0, 0] + EPS / 4 if pre[0, 0] > 0.01 else 0.2
    if pre[0, 0] <= 0.01:
        b_enc[0] += 0.2 + EPS / 4 - pre[0, 0] - 2 * EPS / 4    # move pre[0, 0] to theta - eps/4
    theta[1] = abs(pre[1, 1]) if pre[1, 1] > 0 else 0.05
    if pre[1, 1] <= 0:
        b_enc[1] += 0.05 + EPS / 4 - pre[1, 1]
    # float32-representable values, so that SAEs built from them (float32 parameters) hold them exactly
    x, W_enc, b_enc, theta, W_dec, b_dec = (a.astype(np.float32).astype(np.float64)
                                            for a in (x, W_enc, b_enc, theta, W_dec, b_dec))
    pre = x @ W_enc + b_enc
    assert pre[0, 0] < theta[0] < pre[0, 0] + EPS / 2      # the trap of DESIGN.md: inactive, in the window
    return x, W_enc, b_enc, theta, W_dec, b_dec, lam


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jumprelu_loss_and_gradients_equal_float64_formulas(seed):
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = near_threshold_case(seed)
    sae = JumpReLUSAE.from_tensors(torch.tensor(W_enc), torch.tensor(W_dec), torch.tensor(b_enc),
                                   torch.tensor(b_dec), torch.tensor(theta), bandwidth=EPS).double()
    out = sae.training_loss(torch.tensor(x), lam, backend="reference")
    out.loss.backward()
    loss, grads = numpy_jumprelu(x, W_enc, b_enc, theta, W_dec, b_dec, EPS, lam)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    names = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "threshold": sae.raw_threshold, "W_dec": sae.W_dec,
             "b_dec": sae.b_dec}
    for name, p in names.items():
        np.testing.assert_allclose(p.grad.numpy(), grads[name], rtol=1e-10, atol=1e-12, err_msg=name)
    # the inactive near-threshold latent contributes to dtheta_0: a backward that visits only active
    # latents would get a different value, and this test would catch it
    pre = x @ W_enc + b_enc
    active_only = near_threshold_oracle_dtheta(x, W_enc, b_enc, theta, W_dec, b_dec, EPS, lam, pre > theta)
    assert abs(active_only[0] - grads["threshold"][0]) > 1e-3 * max(1.0, abs(grads["threshold"][0]))


def near_threshold_oracle_dtheta(x, W_enc, b_enc, theta, W_dec, b_dec, eps, lam, visit):
    """dtheta as DESIGN.md's formula, but summed only over the (token, latent) pairs in `visit`."""
    B = x.shape[0]
    pre = x @ W_enc + b_enc
    f = pre * (pre > theta)
    df = (2 * (f @ W_dec + b_dec - x) / B) @ W_dec.T
    K = (np.abs((pre - theta) / eps) < 0.5) * visit
    return np.sum(-(theta / eps) * K * df - (lam / B) * (1 / eps) * K, axis=0)


def test_log_theta_gradient_is_chain_rule_of_raw():
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = near_threshold_case(3)
    sae = JumpReLUSAE(x.shape[1], W_enc.shape[1], theta_parametrisation="log", bandwidth=EPS).double()
    with torch.no_grad():
        for name, v in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(torch.tensor(v))
        sae.log_threshold.copy_(torch.tensor(np.log(theta)))
    sae.training_loss(torch.tensor(x), lam, "reference").loss.backward()
    _, grads = numpy_jumprelu(x, W_enc, b_enc, theta, W_dec, b_dec, EPS, lam)
    np.testing.assert_allclose(sae.log_threshold.grad.numpy(), grads["threshold"] * theta, rtol=1e-10, atol=1e-12)


def test_jumprelu_l1_threshold_gradient_matches_float64():
    """L1 variant: loss = mse + lam * sum f; dtheta = -(theta/eps) K(...) (df + lam/B)."""
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = near_threshold_case(4)
    sae = JumpReLUSAE.from_tensors(torch.tensor(W_enc), torch.tensor(W_dec), torch.tensor(b_enc),
                                   torch.tensor(b_dec), torch.tensor(theta), bandwidth=EPS, sparsity_loss="l1").double()
    out = sae.training_loss(torch.tensor(x), lam, "reference")
    out.loss.backward()
    B = x.shape[0]
    pre = x @ W_enc + b_enc
    H = (pre > theta).astype(np.float64)
    f = pre * H
    x_hat = f @ W_dec + b_dec
    assert out.loss.item() == pytest.approx(np.mean(np.sum((x - x_hat) ** 2, 1) + lam * f.sum(1)), rel=1e-12)
    df = (2 * (x_hat - x) / B) @ W_dec.T + lam / B
    K = (np.abs((pre - theta) / EPS) < 0.5)
    np.testing.assert_allclose(sae.raw_threshold.grad.numpy(), np.sum(-(theta / EPS) * K * df, 0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sae.b_enc.grad.numpy(), (df * H).sum(0), rtol=1e-10, atol=1e-12)


def test_initialisation_follows_design():
    cfg = OmegaConf.structured(SAEConfig(width=40))
    sae = build_sae(cfg, 12, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.all(sae.threshold == 1e-3)
    other = build_sae(cfg, 12, torch.Generator().manual_seed(1))
    assert not torch.equal(sae.W_dec, other.W_dec)


def test_schedules():
    o = OmegaConf.structured(OptimConfig(lr=1.0, lr_warmup_steps=100, lambda_warmup_steps=1000))
    assert lr_at(0, 10_000, o) == pytest.approx(0.1)
    assert lr_at(50, 10_000, o) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 10_000, o) == 1.0 and lr_at(5000, 10_000, o) == 1.0
    assert lambda_at(0, 2.0, o) == 0.0 and lambda_at(500, 2.0, o) == pytest.approx(1.0)
    assert lambda_at(1000, 2.0, o) == 2.0 and lambda_at(5000, 2.0, o) == 2.0
    o.lr_decay_fraction = 0.1
    assert lr_at(9500, 10_000, o) == pytest.approx(0.5)


def test_step_keeps_decoder_unit_norm_and_uses_adam_betas():
    cfg = OmegaConf.create({"sae": OmegaConf.structured(SAEConfig(width=16)),
                            "optim": OmegaConf.structured(OptimConfig(lr=1e-2, lr_warmup_steps=0, lambda_warmup_steps=0)),
                            "train": {"seed": 0, "dead_window_tokens": 1000, "dense_fraction": 0.1}})
    m = Member("m", "/tmp/unused", cfg, 8, 100, "cpu", "reference")
    assert m.optimizer.param_groups[0]["betas"] == (0.0, 0.999)
    x = torch.randn(32, 8)
    W_before = m.sae.W_dec.detach().clone()
    m.step(x, 0, x.var(0).sum())
    g = m.sae.W_dec.grad
    assert torch.allclose((g * W_before).sum(1), torch.zeros(16), atol=1e-6)   # parallel part removed
    torch.testing.assert_close(m.sae.W_dec.norm(dim=1), torch.ones(16))
    assert not torch.equal(m.sae.W_dec, W_before)


def test_free_decoder_starts_at_its_norm_and_takes_plain_adam_steps():
    """sae.decoder_norm > 0 (SAELens's init): W_dec and W_enc = W_dec^T start with rows of that norm, and
    a step is Adam's on the raw gradient (no projection): with beta1 0, lr * g / (|g| + eps) exactly."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    m = _member(SAEConfig(width=16, decoder_norm=0.1, sparsity_coeff=0.1, bandwidth=0.5), lr=1e-3)
    torch.testing.assert_close(m.sae.W_dec.norm(dim=1), torch.full((16,), 0.1))
    torch.testing.assert_close(m.sae.W_enc, m.sae.W_dec.T)
    W_before = m.sae.W_dec.detach().clone()
    m.step(x, 0, x.var(0).sum())
    g = m.sae.W_dec.grad
    assert (g * W_before).sum(1).abs().max() > 1e-4       # the parallel part kept
    torch.testing.assert_close(m.sae.W_dec, W_before - 1e-3 * g / (g.abs() + 1e-8))
    unit = _member(SAEConfig(width=16, sparsity_coeff=0.1, bandwidth=0.5), lr=1e-3)
    unit.step(x, 0, x.var(0).sum())
    torch.testing.assert_close(unit.sae.W_dec.norm(dim=1), torch.ones(16))


def test_free_decoder_is_saved_as_the_same_sae_with_unit_norm_rows():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    m = _member(SAEConfig(width=16, decoder_norm=0.1, sparsity_coeff=0.01, bandwidth=0.5, theta_init=0.01), lr=1e-2)
    for step in range(20):
        m.step(x, step, x.var(0).sum())
    assert (m.sae.W_dec.norm(dim=1) - 1).abs().min() > 0.1        # free: far from unit norm
    saved = type(m.sae).from_tensors(**m.sae.export_tensors(), **m.sae.hyperparameters())
    torch.testing.assert_close(saved.W_dec.norm(dim=1), torch.ones(16))
    with torch.no_grad():
        f, f_saved = m.sae.encode(x), saved.encode(x)
        assert 0 < int((f > 0).sum()) < f.numel()
        torch.testing.assert_close(f_saved > 0, f > 0)
        torch.testing.assert_close(f_saved, f * m.sae.W_dec.norm(dim=1))
        torch.testing.assert_close(saved(x), m.sae(x))


@pytest.mark.parametrize("fields", [dict(architecture="jumprelu", sparsity_loss="l1"), dict(architecture="topk", k=4),
                                    dict(architecture="relu"), dict(architecture="gated")])
def test_free_decoder_refused_where_it_cannot_be_folded_into_unit_norm_rows(fields):
    with pytest.raises(ValueError, match="decoder_norm"):
        _member(SAEConfig(width=16, decoder_norm=0.1, **fields))


def _member(sae_cfg: SAEConfig, lr: float = 1e-2, **optim) -> Member:
    cfg = OmegaConf.create({"sae": OmegaConf.structured(sae_cfg),
                            "optim": OmegaConf.structured(OptimConfig(lr=lr, lr_warmup_steps=0, lambda_warmup_steps=0,
                                                                      **optim)),
                            "train": {"seed": 0, "dead_window_tokens": 1000, "dense_fraction": 0.1}})
    return Member("m", "/tmp/unused", cfg, 8, 100, "cpu", "reference")


@pytest.mark.parametrize("parametrisation", ["raw", "log"])
def test_threshold_lr_moves_only_the_thresholds_at_their_own_rate(parametrisation):
    """sae.threshold_lr: Adam's first step (beta1 0: a step of exactly lr per entry with a gradient)
    moves each threshold parameter by threshold_lr and every other parameter by optim.lr; set equal
    to optim.lr it trains bit for bit as without it."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    base = dict(width=16, theta_init=0.05, theta_parametrisation=parametrisation, sparsity_coeff=0.1,
                bandwidth=0.5)                           # wide: every threshold gets a gradient
    name = f"{parametrisation}_threshold"
    own = _member(SAEConfig(**base, threshold_lr=0.01, threshold_travel=0), lr=1e-3)
    before = {n: p.detach().clone() for n, p in own.sae.named_parameters()}
    own.step(x, 0, x.var(0).sum())
    moved = (own.sae.get_parameter(name) - before[name]).abs()
    has_grad = moved > 0
    assert has_grad.any()
    torch.testing.assert_close(moved[has_grad], torch.full_like(moved[has_grad], 0.01), rtol=1e-4, atol=0)
    step_b = (own.sae.b_enc - before["b_enc"]).abs()
    assert step_b.max() <= 1e-3 * (1 + 1e-4) and step_b.max() > 5e-4
    plain = _member(SAEConfig(**base), lr=1e-2)
    same = _member(SAEConfig(**base, threshold_lr=1e-2, threshold_travel=0.5), lr=1e-2)   # 0.5/100 steps < 1e-2
    assert same.threshold_lr == 1e-2
    assert _member(SAEConfig(**base, threshold_lr=1e-3, threshold_travel=8)).threshold_lr == 8 / 100
    assert _member(SAEConfig(**base, threshold_travel=8)).threshold_lr == 0        # no own lr: travel unused
    assert len(same.optimizer.param_groups) == 2 and len(plain.optimizer.param_groups) == 1
    for step in range(5):
        plain.step(x, step, x.var(0).sum())
        same.step(x, step, x.var(0).sum())
    for (n, a), (_, b) in zip(plain.sae.named_parameters(), same.sae.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_bias_lr_scale_moves_the_biases_at_their_own_rate(arch):
    """optim.bias_lr_scale: Adam's first step (beta1 0: exactly lr per entry with a gradient) moves every
    b_* by scale * lr, every other parameter by lr, the thresholds by their own lr; scale 1 keeps one
    group and trains bit for bit as before it existed."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4)) + 0.5
    base = dict(architecture=arch, width=16, theta_init=0.05, sparsity_coeff=0.1, bandwidth=0.5)
    m = _member(SAEConfig(**base, threshold_lr=0.02, threshold_travel=0), lr=1e-3, beta1=0.0, bias_lr_scale=0.25)
    biases = {n for n, _ in m.sae.named_parameters() if n.startswith("b_")}
    assert biases == ({"b_enc", "b_dec"} if arch == "jumprelu" else {"b_gate", "b_mag", "b_dec"})
    before = {n: p.detach().clone() for n, p in m.sae.named_parameters()}
    m.step(x, 0, x.var(0).sum())
    for n, p in m.sae.named_parameters():
        moved = (p.detach() - before[n]).abs()
        want = 0.25e-3 if n in biases else 0.02 if "threshold" in n else 1e-3
        assert moved.max() > 0, n
        if n != "W_dec":                                   # projected back to unit rows after the step
            torch.testing.assert_close(moved.max(), torch.tensor(want), rtol=1e-3, atol=0, msg=n)
    plain = _member(SAEConfig(**base), lr=1e-2)
    same = _member(SAEConfig(**base), lr=1e-2, bias_lr_scale=1.0)
    assert len(same.optimizer.param_groups) == 1
    for step in range(5):
        plain.step(x, step, x.var(0).sum())
        same.step(x, step, x.var(0).sum())
    for (n, a), (_, b) in zip(plain.sae.named_parameters(), same.sae.named_parameters()):
        assert torch.equal(a, b), n
    bad = OmegaConf.create({"sae": OmegaConf.structured(SAEConfig(**base)),
                            "optim": OmegaConf.structured(OptimConfig(bias_lr_scale=0.0))})
    with pytest.raises(ValueError, match="bias_lr_scale"):
        check_member("m", bad)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_folding_gives_raw_unit_sae(arch):
    torch.manual_seed(0)
    d, W, c = 8, 24, 7.5
    cfg = OmegaConf.structured(SAEConfig(architecture=arch, width=W, k=4, theta_init=0.05))
    sae = build_sae(cfg, d, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in sae.parameters():
            if p.ndim == 1:
                p.add_(torch.rand_like(p) * 0.1)
    x = torch.randn(64, d) * c
    raw = sae.folded(c)
    torch.testing.assert_close(raw.encode(x), c * sae.encode(x / c), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw(x), c * sae(x / c), rtol=1e-5, atol=1e-5)
    assert raw.architecture == arch and raw.d_in == d and raw.d_sae == W


def test_dead_and_dense_latent_bookkeeping_matches_brute_force():
    from train.metrics import LatentStats
    rng = np.random.default_rng(0)
    W, B, window = 12, 10, 40
    rates = np.array([0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.02, 0.0, 0.3, 0.08, 0.15])
    stats = LatentStats(W, window, 0.1, "cpu")
    history = []
    for step in range(23):
        active = rng.random((B, W)) < rates
        if step == 5:
            active[:, 8] = True              # latent 8 fires once, early, then never again
        history.append(active)
        stats.update(torch.from_numpy(active.sum(0)), B)
        seen = np.concatenate(history)
        last = seen[-min(window, len(seen)):]
        assert stats.dead() == int((~last.any(0)).sum()), step
    # dense: over the current and the previous completed window of tokens
    n_tokens = 23 * B
    start = (n_tokens // window - 1) * window
    span = np.concatenate(history)[start:]
    assert stats.dense() == int((span.mean(0) > 0.1).sum())


def test_topk_auxk_loss_and_gradient_to_dead_latents():
    torch.manual_seed(0)
    d, W, k, aux_k = 6, 20, 3, 4
    sae = build_sae(OmegaConf.structured(SAEConfig(architecture="topk", width=W, k=k, aux_k=aux_k,
                                                    aux_coeff=0.5)), d, torch.Generator().manual_seed(0)).double()
    x = torch.randn(16, d, dtype=torch.float64)
    dead = torch.zeros(W, dtype=torch.bool)
    dead[[1, 4, 7, 9, 13, 17]] = True
    out = sae.training_loss(x, 0.0, "reference", dead=dead)
    out.loss.backward()
    # float64 NumPy oracle of the loss
    We, be, Wd, bd = (t.detach().numpy() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    xn = x.numpy()
    pre = xn @ We + be

    def top(p, kk):
        f = np.zeros_like(p)
        idx = np.argsort(-p, axis=1)[:, :kk]
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(p, idx, 1), 0), 1)
        return f

    x_hat = top(pre, k) @ Wd + bd
    z = top(np.where(dead.numpy(), pre, -np.inf), aux_k)
    aux = np.mean(np.sum(((xn - x_hat) - z @ Wd) ** 2, 1))
    mse = np.mean(np.sum((xn - x_hat) ** 2, 1))
    assert out.loss.item() == pytest.approx(mse + 0.5 * aux, rel=1e-12)
    assert out.mse.item() == pytest.approx(mse, rel=1e-12)
    # AuxK sends gradient to the dead latents it picked (with a positive pre-activation), and only to them
    with_aux = sae.b_enc.grad.clone()
    sae.zero_grad()
    sae.training_loss(x, 0.0, "reference", dead=torch.zeros(W, dtype=torch.bool)).loss.backward()
    changed = set(np.flatnonzero((with_aux != sae.b_enc.grad).numpy()))
    picked = set(np.flatnonzero((z > 0).any(0)))
    assert picked and changed == picked

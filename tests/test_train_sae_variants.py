"""The SAE families beyond the paper's recipe, against independent oracles: float64 NumPy formulas
written here, and SAELens's own training SAEs (quadratic, tanh, STE to inputs) on the same weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import kernels
from train.config import SAEConfig
from train.sae import BatchTopKSAE, JumpReLUSAE, build_sae
from train.sae.base import matryoshka_mse

from tests.test_train_sae_math import EPS, near_threshold_case


def _sae(case, **kw):
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = case
    sae = JumpReLUSAE.from_tensors(torch.tensor(W_enc), torch.tensor(W_dec), torch.tensor(b_enc),
                                   torch.tensor(b_dec), torch.tensor(theta), bandwidth=EPS, **kw).double()
    return sae, torch.tensor(x), lam


def _grads(sae):
    return {"W_enc": sae.W_enc.grad, "b_enc": sae.b_enc.grad, "threshold": sae.raw_threshold.grad,
            "W_dec": sae.W_dec.grad, "b_dec": sae.b_dec.grad}


def numpy_general(x, W_enc, b_enc, theta, W_dec, b_dec, eps, lam, T, U, ste_to_input):
    """Gradients of lam*L0 + mse + <l0_tokens, T> + <fire_counts, U> by the STE formulas, float64."""
    B = x.shape[0]
    pre = x @ W_enc + b_enc
    H = (pre > theta).astype(np.float64)
    f = pre * H
    x_hat = f @ W_dec + b_dec
    g = 2 * (x_hat - x) / B
    df = g @ W_dec.T
    K = (np.abs((pre - theta) / eps) < 0.5) / eps
    coef = lam / B + T[:, None] + U[None, :]
    ste = K * (theta * df + coef)
    dpre = df * H + (ste if ste_to_input else 0)
    return {"W_enc": x.T @ dpre, "b_enc": dpre.sum(0), "threshold": -ste.sum(0), "W_dec": f.T @ g,
            "b_dec": g.sum(0)}, H


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_reference_counts_and_ste_to_input_equal_float64_formulas(ste_to_input):
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = near_threshold_case(5)
    rng = np.random.default_rng(0)
    T, U = rng.standard_normal(x.shape[0]), rng.standard_normal(W_enc.shape[1])
    params = [torch.tensor(a, requires_grad=True) for a in (W_enc, b_enc, theta, W_dec, b_dec)]
    out = kernels.jumprelu_sae(torch.tensor(x), *params, bandwidth=EPS, sparsity_coeff=lam, backend="reference",
                               ste_to_input=ste_to_input)
    (out.loss + (out.l0_tokens * torch.tensor(T)).sum() + (out.fire_counts * torch.tensor(U)).sum()).backward()
    want, H = numpy_general(x, W_enc, b_enc, theta, W_dec, b_dec, EPS, lam, T, U, ste_to_input)
    np.testing.assert_array_equal(out.l0_tokens.detach().numpy(), H.sum(1))
    np.testing.assert_array_equal(out.fire_counts.detach().numpy(), H.sum(0))
    for p, name in zip(params, ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")):
        np.testing.assert_allclose(p.grad.numpy(), want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_b_dec_to_input_gradients_equal_float64_formulas_and_export_folds_it():
    """sae.b_dec_to_input (SAELens's apply_b_dec_to_input): pre = (x - b_dec) W_enc + b_enc, through the
    kernels' entry point; b_dec's gradient gains -W_enc dpre. Saved, the SAE encodes x itself."""
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = near_threshold_case(6)
    b_dec = b_dec + 0.3                                     # a bias that matters,
    b_enc = b_enc + b_dec @ W_enc                           # with pre-activations still near the thresholds
    sae, xt, _ = _sae((x, W_enc, b_enc, theta, W_dec, b_dec, lam), b_dec_to_input=True)
    sae.training_loss(xt, lam, "reference").loss.backward()
    W_enc, b_enc, theta, W_dec, b_dec = (t.detach().numpy() for t in (sae.W_enc, sae.b_enc, sae.threshold, sae.W_dec,
                                                                      sae.b_dec))   # as stored (float32 values)
    B, xc = x.shape[0], x - b_dec
    pre = xc @ W_enc + b_enc
    H = (pre > theta).astype(np.float64)
    f = pre * H
    g = 2 * (f @ W_dec + b_dec - x) / B
    df = g @ W_dec.T
    ste = (np.abs((pre - theta) / EPS) < 0.5) / EPS * (theta * df + lam / B)
    dpre = df * H
    want = {"W_enc": xc.T @ dpre, "b_enc": dpre.sum(0), "threshold": -ste.sum(0), "W_dec": f.T @ g,
            "b_dec": g.sum(0) - dpre.sum(0) @ W_enc.T}
    assert H.any() and not H.all() and ste.any()
    for name, grad in _grads(sae).items():
        np.testing.assert_allclose(grad.numpy(), want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    saved = JumpReLUSAE.from_tensors(**sae.export_tensors(), **sae.hyperparameters())
    assert not saved.b_dec_to_input
    with torch.no_grad():
        torch.testing.assert_close(saved.encode(xt.float()).double(), sae.encode(xt), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="b_dec_to_input"):
        build_sae(SAEConfig(architecture="topk", k=4, width=16, b_dec_to_input=True), 8, torch.Generator())


def test_quadratic_and_frequency_penalties_equal_float64_formulas():
    case = near_threshold_case(6)
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = case
    target, fcoef, ftarget = 3.0, 0.7, 0.2
    sae, xt, _ = _sae(case, sparsity_loss="quadratic", target_l0=target, frequency_coeff=fcoef,
                      frequency_target=ftarget)
    out = sae.training_loss(xt, lam, "reference")
    out.loss.backward()
    B = x.shape[0]
    pre = x @ W_enc + b_enc
    H = (pre > theta).astype(np.float64)
    x_hat = (pre * H) @ W_dec + b_dec
    l0, rate = H.sum(1), H.mean(0)
    loss = (np.sum((x - x_hat) ** 2, 1).mean() + lam * np.mean(2 / target * (l0 - target) ** 2)
            + fcoef * np.sum(np.maximum(rate - ftarget, 0) ** 2))
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    T = lam / B * 4 / target * (l0 - target)
    U = fcoef * 2 * np.maximum(rate - ftarget, 0) / B
    want, _ = numpy_general(x, W_enc, b_enc, theta, W_dec, b_dec, EPS, 0.0, T, U, False)
    for name, g in _grads(sae).items():
        np.testing.assert_allclose(g.numpy(), want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_pre_activation_loss_pulls_only_dead_latents():
    case = near_threshold_case(7)
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = case
    coeff = 0.3
    sae, xt, _ = _sae(case, pre_act_coeff=coeff)
    dead = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    dead[[2, 5]] = True
    with_pre = sae.training_loss(xt, lam, "reference", dead=dead)
    with_pre.loss.backward()
    got = {k: v.clone() for k, v in _grads(sae).items()}
    sae.zero_grad()
    sae.training_loss(xt, lam, "reference", dead=None).loss.backward()
    pre = x @ W_enc + b_enc
    gap = theta[None, [2, 5]] - pre[:, [2, 5]]
    assert with_pre.loss.item() - sae.training_loss(xt, lam, "reference").loss.item() == pytest.approx(
        coeff * np.maximum(gap, 0).sum(1).mean(), rel=1e-12)
    below = (gap > 0).astype(np.float64)
    # d/d b_enc_i = -coeff/B * #(below); d/d theta_i = +coeff/B * #(below), for dead i only
    extra_b = np.zeros(W_enc.shape[1])
    extra_b[[2, 5]] = -coeff / x.shape[0] * below.sum(0)
    np.testing.assert_allclose((got["b_enc"] - sae.b_enc.grad).numpy(), extra_b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((got["threshold"] - sae.raw_threshold.grad).numpy(), -extra_b, rtol=1e-10, atol=1e-12)


def _saelens_jumprelu(case, mode, ste_to_input=False, dead=None, **extra):
    """SAELens's own JumpReLU training SAE holding the same weights, and its loss's gradients."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = case
    cfg = JumpReLUTrainingSAEConfig(d_in=x.shape[1], d_sae=W_enc.shape[1], dtype="float64", apply_b_dec_to_input=False,
                                    jumprelu_bandwidth=EPS, jumprelu_sparsity_loss_mode=mode,
                                    jumprelu_ste_to_input=ste_to_input, l0_coefficient=lam, **extra)
    theirs = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        for name, v in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(theirs, name).copy_(torch.tensor(v))
    theirs.threshold = torch.nn.Parameter(torch.tensor(theta))         # float64, like ours here
    out = theirs.training_forward_pass(TrainStepInput(sae_in=torch.tensor(x), coefficients={"l0": lam},
                                                      dead_neuron_mask=dead, n_training_steps=0,
                                                      is_logging_step=False))
    out.loss.backward()
    assert sae_lens is not None
    return out.loss.item(), {"W_enc": theirs.W_enc.grad, "b_enc": theirs.b_enc.grad, "threshold": theirs.threshold.grad,
                             "W_dec": theirs.W_dec.grad, "b_dec": theirs.b_dec.grad}


@pytest.mark.parametrize("variant", [
    dict(mode="quadratic", ours=dict(sparsity_loss="quadratic", target_l0=2.5), extra=dict(target_l0=2.5)),
    dict(mode="tanh", ours=dict(sparsity_loss="tanh", tanh_scale=3.0), extra=dict(jumprelu_tanh_scale=3.0)),
    dict(mode="step", ours=dict(sparsity_loss="l0", ste_to_input=True), extra={}, ste=True),
    dict(mode="quadratic", ours=dict(sparsity_loss="quadratic", target_l0=4.0, ste_to_input=True),
         extra=dict(target_l0=4.0), ste=True),
], ids=["quadratic", "tanh", "step-ste", "quadratic-ste"])
def test_variants_equal_saelens_on_the_same_weights(variant):
    case = near_threshold_case(8)
    loss, want = _saelens_jumprelu(case, variant["mode"], variant.get("ste", False), **variant["extra"])
    sae, xt, lam = _sae(case, **variant["ours"])
    out = sae.training_loss(xt, lam, "reference")
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    for name, g in _grads(sae).items():
        if name == "W_dec":
            # SAELens's tanh penalty multiplies by ||W_dec_i||, whose gradient is along the row: with
            # unit-norm rows it is 1, and training drops the along-row component (train/optim.py)
            g, w = _perpendicular(g, sae.W_dec), _perpendicular(want[name], sae.W_dec)
        else:
            w = want[name]
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("pre_act_coeff", [0.0, 0.3], ids=["tanh", "tanh-pre-act"])
def test_tanh_with_free_decoder_rows_equals_saelens(pre_act_coeff):
    """sae.decoder_norm > 0 with the tanh loss: the penalty (and the pre-activation loss) weigh each code
    by its row's norm, as SAELens's do, so that every gradient, W_dec's along its rows included,
    is SAELens's on the same weights with rows far from unit norm."""
    x, W_enc, b_enc, theta, W_dec, b_dec, lam = near_threshold_case(9)
    norms = np.linspace(0.3, 2.0, W_dec.shape[0])
    case = (x, W_enc, b_enc, theta, (W_dec * norms[:, None]).astype(np.float32).astype(np.float64), b_dec, lam)
    dead = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    dead[[0, 3, 7]] = True
    extra = dict(jumprelu_tanh_scale=3.0) | (dict(pre_act_loss_coefficient=pre_act_coeff) if pre_act_coeff else {})
    loss, want = _saelens_jumprelu(case, "tanh", dead=dead, **extra)
    sae, xt, _ = _sae(case, sparsity_loss="tanh", tanh_scale=3.0, pre_act_coeff=pre_act_coeff)
    sae.unit_norm_decoder = False
    assert sae.can_free_decoder()
    out = sae.training_loss(xt, lam, "reference", dead=dead)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    for name, g in _grads(sae).items():
        np.testing.assert_allclose(g.numpy(), want[name].numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
    # the saved SAE (unit-norm rows, float32 tensors) has the same loss: the fold leaves each code times
    # its norm alone
    saved = JumpReLUSAE.from_tensors(**{k: v.detach() for k, v in sae.export_tensors().items()},
                                     bandwidth=EPS, sparsity_loss="tanh", tanh_scale=3.0,
                                     pre_act_coeff=pre_act_coeff).double()
    assert saved.training_loss(xt, lam, "reference", dead=dead).loss.item() == pytest.approx(loss, rel=1e-6)


def _perpendicular(grad, W_dec):
    rows = W_dec.detach() / W_dec.detach().norm(dim=1, keepdim=True)
    return grad - (grad * rows).sum(1, keepdim=True) * rows


@pytest.mark.parametrize("mode", ["step", "tanh"])
def test_saelens_recipe_in_our_trainer_trains_as_saelens_own_trainer(mode):
    """SAELens's JumpReLU step recipe written as our config (conf/quality_recipes_free_decoder.yaml's
    saelens_exact, on data whose scale is 1 so that no unit converts), and its tanh recipe the same way
    (conf/sae/jumprelu_tanh_saelens.yaml): from the same initial weights on the same batches, our Member and
    SAELens's SAETrainer make the same 40 Adam steps."""
    pytest.importorskip("sae_lens")
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from train.config import OptimConfig
    from train.member import Member
    d, width, batch, steps, lr, lam = 8, 32, 64, 40, 2e-3, 0.3
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randn(batch, d, generator=gen) * torch.linspace(0.2, 0.5, d) + 0.3 for _ in range(steps)]
    sae_cfg = SAEConfig(width=width, sparsity_coeff=lam, decoder_norm=0.1, theta_init=0.01, bandwidth=0.05,
                        b_dec_to_input=True, sparsity_loss="l0" if mode == "step" else "tanh", tanh_scale=4.0)
    optim = OptimConfig(lr=lr, beta1=0.9, grad_clip_norm=1.0, lr_warmup_steps=0, lambda_warmup_steps=0)
    cfg = OmegaConf.create({"sae": OmegaConf.structured(sae_cfg), "optim": OmegaConf.structured(optim),
                            "train": {"seed": 0, "dead_window_tokens": 1000, "dense_fraction": 0.1}})
    ours = Member("m", "/tmp/unused", cfg, d, steps, "cpu", "reference")
    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=width, l0_coefficient=lam,
                                                           jumprelu_init_threshold=0.01, jumprelu_bandwidth=0.05,
                                                           jumprelu_sparsity_loss_mode=mode,
                                                           jumprelu_tanh_scale=4.0))
    names = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec", "threshold": "raw_threshold"}
    with torch.no_grad():
        for theirs_name, ours_name in names.items():
            getattr(theirs, theirs_name).copy_(ours.sae.get_parameter(ours_name))
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                                              lr=lr, lr_end=lr, lr_warm_up_steps=0), sae=theirs,
                         data_provider=iter(batches))
    trainer.fit()
    start = ours.sae.raw_threshold.detach().clone()
    for step, x in enumerate(batches):
        ours.step(x, step, x.var(0).sum())
    assert (ours.sae.raw_threshold - start).abs().max() > 10 * lr       # the thresholds did train
    for theirs_name, ours_name in names.items():
        torch.testing.assert_close(ours.sae.get_parameter(ours_name), getattr(theirs, theirs_name).detach(),
                                   rtol=1e-4, atol=1e-5, msg=theirs_name)


def test_matryoshka_mse_equals_prefix_reconstructions():
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.rand(7, 12, generator=g, dtype=torch.float64)
    W_dec, b_dec = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    widths = (3, 8, 12)
    want = np.mean([((f[:, :w] @ W_dec[:w] + b_dec - x) ** 2).sum(1).mean().item() for w in widths])
    assert matryoshka_mse(x, f, W_dec, b_dec, widths).item() == pytest.approx(want, rel=1e-12)
    # one prefix, the full width: the plain reconstruction loss
    sae_plain, xt, lam = _sae(near_threshold_case(9))
    sae_m, _, _ = _sae(near_threshold_case(9), matryoshka_widths=[sae_plain.d_sae])
    a, b = sae_plain.training_loss(xt, lam, "reference"), sae_m.training_loss(xt, lam, "reference")
    a.loss.backward()
    b.loss.backward()
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12)
    for (name, ga), gb in zip(_grads(sae_plain).items(), _grads(sae_m).values()):
        np.testing.assert_allclose(ga.numpy(), gb.numpy(), rtol=1e-10, atol=1e-13, err_msg=name)
    with pytest.raises(ValueError, match="ascending"):
        JumpReLUSAE(4, 8, matryoshka_widths=[6, 3])


def test_batchtopk_keeps_the_batch_largest_and_learns_a_jumprelu_threshold():
    g = torch.Generator().manual_seed(1)
    sae = BatchTopKSAE(6, 20, torch.Generator().manual_seed(0), k=3, threshold_momentum=0.25)
    smallest = []
    for _ in range(6):
        x = torch.randn(16, 6, generator=g)
        pre = x @ sae.W_enc + sae.b_enc
        out = sae.training_loss(x, 0.0, "reference")
        kept = torch.relu(pre).flatten().topk(48).values
        assert int(out.firings.sum()) == 48 and out.l0.item() == pytest.approx(3.0)
        smallest.append(kept[-1].item())
    # plain mean while 1/steps > momentum (steps 1-4), then the running mean at the momentum
    want = np.mean(smallest[:4])
    for s in smallest[4:]:
        want = 0.75 * want + 0.25 * s
    assert torch.allclose(sae.threshold, torch.full((20,), want, dtype=sae.threshold.dtype), rtol=1e-6)
    x = torch.randn(16, 6, generator=g)
    pre = x @ sae.W_enc + sae.b_enc
    assert torch.equal(sae.encode(x), pre * (pre > sae.threshold))      # inference: a JumpReLU
    again = BatchTopKSAE.from_tensors(**sae.export_tensors(), **sae.hyperparameters())
    assert torch.equal(again.encode(x), sae.encode(x))


def test_config_builds_every_family_and_rejects_bad_values():
    cfg = OmegaConf.structured(SAEConfig(architecture="batchtopk", width=32, k=2.5, matryoshka_fractions=[0.25, 0.5]))
    sae = build_sae(cfg, 8, torch.Generator().manual_seed(0))
    assert isinstance(sae, BatchTopKSAE) and sae.matryoshka_widths == (8, 16, 32) and sae.k_mean == 2.5
    with pytest.raises(ValueError, match="integer"):
        build_sae(OmegaConf.structured(SAEConfig(architecture="topk", width=32, k=2.5)), 8, torch.Generator())
    with pytest.raises(ValueError, match="target_l0"):
        JumpReLUSAE(4, 8, sparsity_loss="quadratic")


def test_tanh_scale_in_anthropic_units_is_c_sqrt_d_on_the_normalised_space():
    """sae.tanh_scale_unit=sqrt_d (conf/sae/jumprelu_tanh.yaml: Anthropic's c = 4 on data with
    E||x||^2 = d): the penalty on our normalised codes f equals tanh(4 f') on codes f' = sqrt(d) f of the
    same data scaled to E||x||^2 = d, which the SAE's own loss must reproduce. Unknown units are refused
    before any work."""
    from train.members import check_member
    from train.config import Config
    d = 16
    preset = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "sae" / "jumprelu_tanh.yaml")
    assert preset.tanh_scale == 4.0 and preset.tanh_scale_unit == "sqrt_d"
    cfg = OmegaConf.structured(SAEConfig(sparsity_loss="tanh", tanh_scale=4.0, tanh_scale_unit="sqrt_d", width=32))
    sae = build_sae(cfg, d, torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, d, generator=g, dtype=torch.float64) / d ** 0.5          # E||x||^2 = 1
    with torch.no_grad():
        sae.b_enc.copy_(torch.rand(32, generator=g, dtype=torch.float64) * 0.3)
    lam = 0.1
    out = sae.training_loss(x, lam, "reference")
    scaled = sae.encode(x) * d ** 0.5 * sae.W_dec.norm(dim=1)                      # Anthropic's f |W_dec|
    assert (scaled > 0).any()
    want = lam * torch.tanh(4.0 * scaled).sum(-1).mean()
    assert float(out.loss - out.mse) == pytest.approx(float(want), rel=1e-9)
    assert float(build_sae(OmegaConf.structured(SAEConfig(sparsity_loss="tanh", tanh_scale=4.0, width=32)), d,
                           torch.Generator()).tanh_scale) == 4.0                  # rms: as given
    bad = OmegaConf.merge(OmegaConf.structured(Config), {"sae": {"tanh_scale_unit": "raw"}})
    with pytest.raises(ValueError, match="tanh_scale_unit='raw'; choose one of rms, sqrt_d"):
        check_member("m", bad)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "sae").glob("*.yaml")))
def test_every_preset_builds_and_trains(preset):
    """Each conf/sae preset is a valid SAEConfig whose SAE takes finite steps through the trainer's
    member (optimizer, decoder constraint, data-dependent init, dead mask)."""
    from train.config import Config
    from train.member import Member
    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "sae" / f"{preset}.yaml")
    yaml.pop("defaults", None)
    if "k" in yaml:
        yaml.k = 4
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"sae": {**OmegaConf.to_container(yaml), "width": 64}},
                          {"optim": {"lr": 1e-3, "lr_warmup_steps": 2, "lambda_warmup_steps": 2},
                           "train": {"dead_window_tokens": 32}})
    # median_norm: the unit of constants_unit=median_norm presets, which the loop measures on the cache
    member = Member("m", Path("unused"), cfg, 16, 20, torch.device("cpu"), "reference", median_norm=0.8)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        member.step(torch.randn(32, 16, generator=g), step, torch.tensor(1.0))
    assert all(torch.isfinite(torch.stack(member.losses)))
    # unit-norm rows while training, or (sae.decoder_norm > 0: free rows) once saved
    assert member.sae.unit_norm_decoder == (member.cfg.sae.decoder_norm == 0)
    saved = member.sae.export_tensors()["W_dec"] if not member.sae.unit_norm_decoder else member.sae.W_dec
    assert torch.allclose(saved.norm(dim=1), torch.ones(64), atol=1e-5)

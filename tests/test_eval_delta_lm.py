"""Delta LM loss against direct computations on a tiny Gemma 2 built here."""
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM

from evaluate.delta_lm import delta_lm_loss, delta_lm_losses
from train.sae import JumpReLUSAE

BOS = 2
LAYER = 1


@pytest.fixture(scope="module")
def model():
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=64, sliding_window=16, attn_implementation="eager",
                       bos_token_id=BOS)
    torch.manual_seed(0)
    m = Gemma2ForCausalLM(cfg).eval()
    # Non-trivial norm gains, so that the post-feedforward norm's output is not just a unit vector.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(3, 64, (5, 12), generator=g)
    t[:, 0] = BOS
    return t


def _site_module(model, layer):
    return model.model.layers[layer].post_feedforward_layernorm


@contextmanager
def direct_splice(model, layer, sublayer, fn):
    """The oracle's own hook on mlp_out: the output of post_feedforward_layernorm replaced by fn(a)."""
    assert sublayer == "mlp_out"
    handle = _site_module(model, layer).register_forward_hook(lambda mod, inp, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def site_splice():
    from harvest.sites import splice
    return splice


def identity_like_sae(d):
    """A JumpReLU SAE with f = relu([x, -x]) (threshold 0) and W_dec = [I; -I]: x_hat = x exactly."""
    eye = torch.eye(d)
    return JumpReLUSAE.from_tensors(W_enc=torch.cat([eye, -eye], 1), W_dec=torch.cat([eye, -eye], 0),
                                    b_enc=torch.zeros(2 * d), b_dec=torch.zeros(d),
                                    threshold=torch.zeros(2 * d))


def affine_sae(d):
    """The identity-like SAE with a decoder scaled by 1/2 and biased by 0.1: x_hat = x / 2 + 0.1."""
    eye = torch.eye(d)
    return JumpReLUSAE.from_tensors(W_enc=torch.cat([eye, -eye], 1), W_dec=0.5 * torch.cat([eye, -eye], 0),
                                    b_enc=torch.zeros(2 * d), b_dec=torch.full((d,), 0.1),
                                    threshold=torch.zeros(2 * d))


def _oracle_logits(model, tokens, replace):
    """Logits with the site's non-BOS positions replaced by replace(a), by a hook written here."""
    def hook(mod, inp, out):
        new = out.clone()
        new[:, 1:] = replace(out[:, 1:])
        return new
    handle = _site_module(model, LAYER).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits
    finally:
        handle.remove()


def _oracle_ce(logits, tokens):
    return F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()


def _oracle_kl(clean, other):
    V = clean.shape[-1]
    return F.kl_div(torch.log_softmax(other[:, :-1].reshape(-1, V), -1),
                    torch.log_softmax(clean[:, :-1].reshape(-1, V), -1),
                    log_target=True, reduction="batchmean").item()


def test_perfect_reconstruction_has_zero_delta(model, tokens):
    r = delta_lm_loss(model, tokens, LAYER, "mlp_out", identity_like_sae(32), BOS, splice=site_splice(),
                      batch_sequences=2, progress=False)
    assert r.n_predictions == 5 * 11
    assert abs(r.delta_ce) < 1e-5
    assert abs(r.kl_spliced) < 1e-6
    assert r.fraction_recovered == pytest.approx(1.0, abs=1e-4)
    assert r.ce_zero > r.ce_clean + 1e-3      # ablating the site must hurt, or the test proves little


def test_zero_mean_ablation_and_spliced_match_direct_computation(model, tokens):
    sae = affine_sae(32)
    mean = torch.linspace(-1, 1, 32)
    r = delta_lm_loss(model, tokens, LAYER, "mlp_out", sae, BOS, splice=site_splice(),
                      batch_sequences=3, progress=False, mean_activation=mean)
    with torch.no_grad():
        clean = model(input_ids=tokens).logits
    zero = _oracle_logits(model, tokens, torch.zeros_like)
    mean_ablated = _oracle_logits(model, tokens, lambda a: mean.expand_as(a))
    spliced = _oracle_logits(model, tokens, lambda a: 0.5 * a + 0.1)
    ce_clean, ce_zero, ce_mean, ce_spliced = (_oracle_ce(x, tokens) for x in (clean, zero, mean_ablated, spliced))
    assert r.ce_mean == pytest.approx(ce_mean, rel=1e-5)
    assert r.fraction_recovered_mean == pytest.approx((ce_mean - ce_spliced) / (ce_mean - ce_clean), rel=1e-4)
    assert r.kl_mean == pytest.approx(_oracle_kl(clean, mean_ablated), rel=1e-4)
    assert r.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert r.ce_zero == pytest.approx(ce_zero, rel=1e-5)
    assert r.ce_spliced == pytest.approx(ce_spliced, rel=1e-5)
    assert r.delta_ce == pytest.approx(ce_spliced - ce_clean, rel=1e-4, abs=1e-6)
    assert r.fraction_recovered == pytest.approx((ce_zero - ce_spliced) / (ce_zero - ce_clean), rel=1e-4)
    assert r.kl_zero == pytest.approx(_oracle_kl(clean, zero), rel=1e-4)
    assert r.kl_spliced == pytest.approx(_oracle_kl(clean, spliced), rel=1e-4)


def test_bos_is_left_untouched(model, tokens):
    """Zeroing every position including BOS gives a different loss than the reported zero-ablation."""
    r = delta_lm_loss(model, tokens, LAYER, "mlp_out", identity_like_sae(32), BOS, splice=site_splice(),
                      progress=False)

    def zero_all(mod, inp, out):
        return torch.zeros_like(out)
    handle = _site_module(model, LAYER).register_forward_hook(zero_all)
    with torch.no_grad():
        all_zero = model(input_ids=tokens).logits
    handle.remove()
    assert abs(_oracle_ce(all_zero, tokens) - r.ce_zero) > 1e-4


def test_width_mismatch_is_a_clear_error(model, tokens):
    with pytest.raises(ValueError, match="width mismatch.*16.*32"):
        delta_lm_loss(model, tokens, LAYER, "mlp_out", identity_like_sae(16), BOS, splice=site_splice(),
                      progress=False)


def test_several_saes_share_the_clean_and_ablated_forwards(model, tokens):
    saes = [identity_like_sae(32), affine_sae(32)]
    mean = torch.full((32,), 0.25)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        together = delta_lm_losses(model, tokens, LAYER, "mlp_out", saes, BOS, splice=site_splice(),
                                   batch_sequences=5, progress=False, mean_activation=mean)
    finally:
        handle.remove()
    assert len(calls) == len(saes) + 3      # one batch: clean, zero, mean, one spliced forward per SAE
    for sae, got in zip(saes, together):
        alone = delta_lm_loss(model, tokens, LAYER, "mlp_out", sae, BOS, splice=site_splice(),
                              batch_sequences=5, progress=False, mean_activation=mean)
        numbers = {k: v for k, v in alone.to_dict().items() if not isinstance(v, (str, list))}
        assert {k: got.to_dict()[k] for k in numbers} == pytest.approx(numbers, rel=1e-12, abs=1e-12)
        for k in ("delta_ce_per_sequence", "kl_per_sequence"):
            assert len(getattr(got, k)) == len(tokens)
            assert getattr(got, k) == pytest.approx(getattr(alone, k), rel=1e-12, abs=1e-12)


def _oracle_per_sequence(clean, other, tokens):
    """Per sequence: mean next-token CE of `other` minus clean's, and mean KL(clean || other)."""
    V = clean.shape[-1]
    ce = lambda x: F.cross_entropy(x[:, :-1].double().transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)
    lc, lo = (torch.log_softmax(x[:, :-1].double(), -1) for x in (clean, other))
    return ce(other) - ce(clean), (lc.exp() * (lc - lo)).sum(-1).mean(1)


def test_standard_errors_are_over_sequences(model, tokens):
    """delta_ce_se and kl_spliced_se: the sample standard deviation (n - 1) of the per-sequence means,
    over sqrt(n sequences), whatever the batching; the per-sequence values kept in order."""
    r = delta_lm_loss(model, tokens, LAYER, "mlp_out", affine_sae(32), BOS, splice=site_splice(),
                      batch_sequences=2, progress=False)
    with torch.no_grad():
        clean = model(input_ids=tokens).logits
    d_ce, kl = _oracle_per_sequence(clean, _oracle_logits(model, tokens, lambda a: 0.5 * a + 0.1), tokens)
    n = len(tokens)
    assert r.delta_ce == pytest.approx(d_ce.mean().item(), rel=1e-4)
    assert r.delta_ce_se == pytest.approx((d_ce.std(correction=1) / n ** 0.5).item(), rel=1e-4)
    # The KLs are ~1e-4 differences of log-softmaxes taken in float32: their spread agrees to ~3e-4.
    assert r.kl_spliced_se == pytest.approx((kl.std(correction=1) / n ** 0.5).item(), rel=2e-3)
    assert r.delta_ce_se > 0 and r.kl_spliced_se > 0
    # the per-sequence values themselves, in the tokens' order (for paired comparisons of two SAEs)
    torch.testing.assert_close(torch.tensor(r.delta_ce_per_sequence, dtype=torch.float64), d_ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(r.kl_per_sequence, dtype=torch.float64), kl, rtol=2e-3, atol=1e-7)
    one = delta_lm_loss(model, tokens[:1], LAYER, "mlp_out", affine_sae(32), BOS, splice=site_splice(),
                        progress=False)
    assert math.isnan(one.delta_ce_se) and math.isnan(one.kl_spliced_se)   # one sequence: no spread

"""SAEBench's core metrics (evaluate/saebench.py) against computations written here, token by token,
from SAEBench's definitions; and in `make eval`'s report.json and table."""
import csv
import json
import math

import numpy as np
import pytest
import torch
import zarr

from evaluate.config import EvalConfig
from evaluate.run_eval import run_evaluation
from evaluate.saebench import SAEBenchAccumulator, counted_tokens, ignored_token_ids, misc_metrics, saebench_metrics
from tests.cache_factory import stored_as_float, write_cache
from tests.test_eval_features_cache import HELDOUT, calibrated_jumprelu, save_run, tiny_cache
from train.cache_reader import heldout_sequences
from train.run_folder import save_sae
from train.sae import JumpReLUSAE

BOS, EOS, PAD = 2, 1, 0


def oracle(x, x_hat, f, keep, group):
    """SAEBench's definitions, one token at a time, in float64 (x, x_hat [n_seq, T, d]; f [n_seq, T, W])."""
    ev, cos, nin, nout, ratio, l0, l1, biases, n = [], [], [], [], [], [], [], [], 0
    density = np.zeros(f.shape[-1])
    for g0 in range(0, len(x), group):
        rows = [(s, t) for s in range(g0, min(g0 + group, len(x))) for t in range(x.shape[1]) if keep[s, t]]
        if not rows:
            continue
        X = np.array([x[s, t] for s, t in rows], dtype=np.float64)
        XH = np.array([x_hat[s, t] for s, t in rows], dtype=np.float64)
        mean = X.mean(0)
        for (s, t), a, b in zip(rows, X, XH):
            ev.append(1 - ((a - b) ** 2).sum() / ((a - mean) ** 2).sum())
            na, nb = math.sqrt((a ** 2).sum()), math.sqrt((b ** 2).sum())
            cos.append(0.0 if na * nb == 0 else float(a @ b) / (na * nb))
            nin.append(na), nout.append(nb)
            ratio.append(nb / (na if na >= 1e-4 else 1.0))
            l0.append(int((f[s, t] != 0).sum())), l1.append(float(f[s, t].astype(np.float64).sum()))
            density += f[s, t] > 0
            n += 1
        biases.append(np.mean([(b ** 2).sum() for b in XH]) / np.mean([a @ b for a, b in zip(X, XH)]))
    return {"explained_variance": np.mean(ev), "cossim": np.mean(cos), "l2_norm_in": np.mean(nin),
            "l2_norm_out": np.mean(nout), "l2_ratio": np.mean(ratio), "relative_reconstruction_bias": np.mean(biases),
            "l0": np.mean(l0), "l1": np.mean(l1), "density": density / n, "n": n}


def _random_sae(d, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(W, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return JumpReLUSAE.from_tensors(W_enc=W_dec.T.clone() + 0.1 * torch.randn(d, W, generator=g), W_dec=W_dec,
                                    b_enc=0.1 * torch.randn(W, generator=g), b_dec=0.2 * torch.randn(d, generator=g),
                                    threshold=0.3 + torch.rand(W, generator=g))


def test_accumulator_matches_the_definitions_across_uneven_batches_and_groups():
    n_seq, T, d, W = 11, 9, 5, 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_seq, T, d, generator=g) * 2
    tokens = torch.randint(3, 50, (n_seq, T), generator=g)
    tokens[:, 0] = BOS
    tokens[2, 4] = tokens[7, 1] = EOS
    tokens[5, 8] = PAD
    sae = _random_sae(d, W)
    with torch.no_grad():
        f = sae.encode(x.reshape(-1, d))
        x_hat = sae.decode(f)
    x_hat[3] = 0.0           # a token reconstructed as exactly zero: its cossim counts as 0
    f[3] = 0.0
    keep = counted_tokens(tokens, [BOS, EOS, PAD])
    assert int(keep.sum()) == n_seq * (T - 1) - 3
    acc = SAEBenchAccumulator(W, group_sequences=4)
    for lo, hi in ((0, 3), (3, 8), (8, 10), (10, 11)):   # batches straddle the groups of 4 sequences
        sl = slice(lo * T, hi * T)
        acc.update(x[lo:hi], f[sl], x_hat[sl], keep[lo:hi])
    got = acc.result()
    want = oracle(x.numpy(), x_hat.reshape(n_seq, T, d).numpy(), f.reshape(n_seq, T, W).numpy(), keep.numpy(), 4)
    assert got.n_tokens == want["n"]
    for k in ("explained_variance", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias",
              "l0", "l1"):
        assert getattr(got, k) == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    np.testing.assert_allclose(got.feature_density, want["density"], rtol=1e-12)
    assert 0 < want["l0"] < W            # sparse but not silent: the test means something


def test_scores_and_fractions_follow_saebench_formulas():
    lm = {"ce_clean": 3.0, "ce_zero": 5.0, "ce_mean": 4.0, "ce_spliced": 3.5, "kl_zero": 2.0, "kl_mean": 0.8,
          "kl_spliced": 0.3, "n_predictions": 630}
    density = [0.0, 0.005, 0.02, 0.5, 0.0]
    rec = SAEBenchAccumulator(5)
    rec.n, rec.density = 10, torch.tensor(density, dtype=torch.float64) * 10
    rec.sums[:] = torch.tensor([9.0, 8.0, 30.0, 20.0, 7.0, 25.0], dtype=torch.float64)
    rec.biases = [0.9, 0.8]
    out = saebench_metrics(rec.result(), lm)
    assert out["model_behavior_preservation"]["kl_div_score"] == pytest.approx((2.0 - 0.3) / 2.0)
    assert out["model_behavior_preservation"]["kl_div_score_mean_ablation"] == pytest.approx((0.8 - 0.3) / 0.8)
    assert out["model_performance_preservation"]["ce_loss_score"] == pytest.approx((5.0 - 3.5) / (5.0 - 3.0))
    assert out["model_performance_preservation"]["ce_loss_score_mean_ablation"] == pytest.approx(0.5 / 1.0)
    assert out["model_performance_preservation"]["ce_loss_without_sae"] == 3.0
    assert out["reconstruction_quality"] == {"explained_variance": 0.9, "cossim": 0.8}
    assert out["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(0.85)
    assert out["sparsity"]["l0"] == 2.5
    misc = out["misc_metrics"]
    assert misc["frac_alive"] == pytest.approx(3 / 5)
    assert misc["freq_over_1_percent"] == pytest.approx(2 / 5) and misc["freq_over_10_percent"] == pytest.approx(1 / 5)
    assert misc["normalized_freq_over_1_percent"] == pytest.approx(0.52 / 0.525)
    assert misc["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.525)
    assert out["token_stats"] == {"total_tokens_eval_reconstruction": 630, "total_tokens_eval_sparsity_variance": 10}
    skipped = saebench_metrics(rec.result(), {"skipped": "no model"})
    assert math.isnan(skipped["model_performance_preservation"]["ce_loss_score"])
    assert misc_metrics([0.0, 0.0]) == {"frac_alive": 0.0, "freq_over_1_percent": 0.0, "freq_over_10_percent": 0.0,
                                        "normalized_freq_over_1_percent": 0.0, "normalized_freq_over_10_percent": 0.0}


def test_ignored_tokens_come_from_the_cached_model_config():
    assert ignored_token_ids({"model_config": {"eos_token_id": [1, 107], "pad_token_id": 0}}, 2) == [0, 1, 2, 107]
    assert ignored_token_ids({}, 5) == [5]


CTX, ROWS, D, N_SEQ = 16, 64, 6, 48
EV_HELDOUT = {"fraction": 0.5, "seed": 2}


def test_report_and_table_hold_the_saebench_metrics_of_a_synthetic_cache(tmp_path):
    g = np.random.default_rng(0)
    x = g.standard_normal((N_SEQ * CTX, D)).astype(np.float32) + 1.5
    cache = write_cache(tmp_path / "cache", {(1, "mlp_out"): x}, context_length=CTX, chunk_rows=ROWS)
    sae = _random_sae(D, 24, seed=3)
    run = tmp_path / "run"
    save_sae(run, sae, {"model": "synthetic", "layer": 1, "sublayer": "mlp_out", "cache": str(cache),
                        "heldout": EV_HELDOUT})
    with pytest.warns(UserWarning, match="records no model"):
        out = run_evaluation(EvalConfig(run=str(run), progress=False, plots=False, batch_sequences=3,
                                        saebench_group_sequences=5))
    report = json.loads((run / "eval" / "report.json").read_text())
    section = report["saebench"]
    seqs = heldout_sequences(N_SEQ, EV_HELDOUT["fraction"], EV_HELDOUT["seed"])
    xs = torch.from_numpy(stored_as_float(x, "bfloat16").reshape(N_SEQ, CTX, D)[seqs])
    with torch.no_grad():
        f = sae.encode(xs.reshape(-1, D))
        x_hat = sae.decode(f)
    keep = np.ones((len(seqs), CTX), dtype=bool)
    keep[:, 0] = False
    want = oracle(xs.numpy(), x_hat.reshape(xs.shape).numpy(), f.reshape(len(seqs), CTX, -1).numpy(), keep, 5)
    assert section["reconstruction_quality"]["explained_variance"] == pytest.approx(want["explained_variance"], rel=1e-6)
    assert section["reconstruction_quality"]["cossim"] == pytest.approx(want["cossim"], rel=1e-6)
    assert section["shrinkage"]["l2_ratio"] == pytest.approx(want["l2_ratio"], rel=1e-6)
    assert section["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(want["relative_reconstruction_bias"], rel=1e-6)
    assert section["sparsity"]["l1"] == pytest.approx(want["l1"], rel=1e-6)
    assert section["misc_metrics"]["frac_alive"] == pytest.approx(float((want["density"] > 0).mean()))
    assert section["misc_metrics"]["freq_over_10_percent"] == pytest.approx(float((want["density"] > 0.1).mean()))
    assert section["model_performance_preservation"]["ce_loss_score"] is None     # no model: NaN, written as null
    # our pooled FVU and SAEBench's per-token explained variance are different quantities
    assert report["reconstruction"]["fvu"] != pytest.approx(1 - want["explained_variance"], rel=1e-3)
    with open(run / "eval" / "table.csv") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["explained_variance"]) == pytest.approx(want["explained_variance"], rel=1e-6)
    assert {"cossim", "l2_ratio", "relative_reconstruction_bias", "kl_div_score", "ce_loss_score", "l1", "frac_alive",
            "freq_over_1_percent", "freq_over_10_percent"} <= set(row)
    assert out["rows"][0]["cossim"] == pytest.approx(want["cossim"], rel=1e-6)


def _identity_like(d):
    eye = torch.eye(d)
    return JumpReLUSAE.from_tensors(W_enc=torch.cat([eye, -eye], 1), W_dec=torch.cat([eye, -eye], 0),
                                    b_enc=torch.zeros(2 * d), b_dec=torch.zeros(d), threshold=torch.zeros(2 * d))


def test_scores_on_the_tiny_model_and_the_tokens_saebench_counts(tmp_path_factory, tmp_path):
    cache = tiny_cache(tmp_path_factory)
    d = zarr.open_group(str(cache), mode="r")["layer_2/mlp_out"].shape[1]
    cfg = dict(progress=False, delta_lm_sequences=4, plots=False)
    perfect = run_evaluation(EvalConfig(run=str(save_run(tmp_path / "perfect", _identity_like(d), cache)), **cfg))
    sb = perfect["reports"][0]["saebench"]
    assert sb["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    assert sb["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert sb["model_performance_preservation"]["ce_loss_score_mean_ablation"] == pytest.approx(1.0, abs=1e-4)
    assert sb["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert sb["shrinkage"]["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert sb["shrinkage"]["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)

    group = zarr.open_group(str(cache), mode="r")
    T, n = group.attrs["context_length"], group.attrs["n_tokens"]
    tokens = np.asarray(group["tokens"][:]).reshape(n // T, T)[heldout_sequences(n // T, HELDOUT["fraction"], HELDOUT["seed"])]
    config = group.attrs["model_config"]
    counted = ~np.isin(tokens, [config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]])
    counted[:, 0] = False
    assert (tokens == config["eos_token_id"]).any()                 # EOS occur, and are left out
    assert sb["token_stats"]["total_tokens_eval_sparsity_variance"] == int(counted.sum())
    assert perfect["reports"][0]["reconstruction"]["n_tokens"] == tokens[:, 1:].size

    x = torch.from_numpy(np.asarray(group["layer_2/mlp_out"][:4096]).view(np.int16)).view(torch.bfloat16).float()
    sparse = calibrated_jumprelu(x, 256)
    rep = run_evaluation(EvalConfig(run=str(save_run(tmp_path / "sparse", sparse, cache)), **cfg))["reports"][0]
    sb, lm = rep["saebench"], rep["delta_lm"]
    assert sb["model_behavior_preservation"]["kl_div_score"] == pytest.approx(
        (lm["kl_zero"] - lm["kl_spliced"]) / lm["kl_zero"], rel=1e-12)
    assert sb["model_performance_preservation"]["ce_loss_score"] == pytest.approx(lm["fraction_recovered"], rel=1e-12)
    assert 0 < sb["sparsity"]["l0"] < 256 and sb["misc_metrics"]["frac_alive"] > 0.5

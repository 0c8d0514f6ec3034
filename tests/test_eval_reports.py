"""`make eval` on synthetic caches: metrics against direct numpy computations, sweep outputs, bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluate.config import EvalConfig
from evaluate.run_eval import run_evaluation
from evaluate.sources import RunError
from tests.cache_factory import sparse_feature_activations, stored_as_float, write_cache
from train.cache_reader import heldout_sequences
from train.run_folder import save_sae
from train.sae import JumpReLUSAE, TopKSAE

# Synthetic caches record no model: delta LM loss is skipped, with this warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*records no model")

CTX, ROWS, D, N_SEQ = 16, 64, 8, 48
HELDOUT = {"fraction": 0.25, "seed": 3}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    x, features, _ = sparse_feature_activations(N_SEQ * CTX, D, n_features=12, active=2.0, seed=0, noise=0.01)
    x[::CTX] *= 30.0   # BOS outliers: must not leak into any statistic
    cache = write_cache(root / "cache", {(1, "mlp_out"): x}, context_length=CTX, chunk_rows=ROWS)
    return root, cache, stored_as_float(x, "bfloat16"), features


def _jumprelu(features, threshold, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.from_numpy(features) + 0.05 * torch.randn(features.shape, generator=g)
    return JumpReLUSAE.from_tensors(W_enc=W_dec.T.clone(), W_dec=W_dec, b_enc=torch.full((len(features),), -0.1),
                                    b_dec=torch.zeros(features.shape[1]),
                                    threshold=torch.full((len(features),), threshold))


def _save(run_dir, sae, cache, sparsity_loss="l0"):
    save_sae(run_dir, sae, {"model": "synthetic", "layer": 1, "sublayer": "mlp_out", "cache": str(cache),
                            "heldout": HELDOUT, "sparsity_coeff": 1e-3})
    return run_dir


def _cfg(run, **kw):
    kw.setdefault("progress", False)
    return EvalConfig(run=str(run), **kw)


def _oracle(sae, x_all):
    """Metrics computed directly from the activations written to the cache."""
    seqs = heldout_sequences(N_SEQ, HELDOUT["fraction"], HELDOUT["seed"])
    x = x_all.reshape(N_SEQ, CTX, D)[seqs][:, 1:].astype(np.float64)      # drop each BOS
    with torch.no_grad():
        t = torch.from_numpy(x.reshape(-1, D)).float()
        f = sae.encode(t).double().numpy()
        x_hat = sae.decode(sae.encode(t)).double().numpy().reshape(x.shape)
    err = ((x - x_hat) ** 2).sum(-1)
    flat = x.reshape(-1, D)
    freq = (f != 0).mean(0)
    return {"mse": err.mean(), "fvu": err.sum() / ((flat - flat.mean(0)) ** 2).sum(),
            "l0": (f != 0).sum(-1).mean(), "freq": freq, "dead": (freq == 0).mean(),
            "mse_by_position": err.mean(0), "n_tokens": flat.shape[0],
            "var_per_token": ((flat - flat.mean(0)) ** 2).sum() / flat.shape[0]}


def test_run_folder_metrics_match_direct_computation(synthetic):
    root, cache, x_all, features = synthetic
    sae = _jumprelu(features, 0.3)
    run = _save(root / "run_a", sae, cache)
    out = run_evaluation(_cfg(run, batch_sequences=5))
    report = json.loads((run / "eval" / "report.json").read_text())
    oracle = _oracle(sae, x_all)
    rec = report["reconstruction"]
    assert rec["n_tokens"] == oracle["n_tokens"]
    assert rec["mse"] == pytest.approx(oracle["mse"], rel=1e-5)
    assert rec["fvu"] == pytest.approx(oracle["fvu"], rel=1e-5)
    assert rec["l0"] == pytest.approx(oracle["l0"], rel=1e-9)
    assert rec["dead_fraction"] == pytest.approx(oracle["dead"])
    np.testing.assert_allclose(report["firing_frequency"], oracle["freq"], rtol=1e-12)
    assert report["mse_by_position"][0] is None
    np.testing.assert_allclose(report["mse_by_position"][1:], oracle["mse_by_position"], rtol=1e-5)
    np.testing.assert_allclose(report["fvu_by_position"][1:], oracle["mse_by_position"] / oracle["var_per_token"],
                               rtol=1e-5)
    assert np.mean(report["fvu_by_position"][1:]) == pytest.approx(rec["fvu"], rel=1e-5)
    assert "skipped" in report["delta_lm"]       # a synthetic cache records no model
    assert {p.name for p in out["plots"]} >= {"frontier_l0_fvu.png", "firing_frequency.png"}


def test_sweep_folder_gives_table_and_plots(synthetic):
    root, cache, x_all, features = synthetic
    sweep = root / "sweep"
    for i, th in enumerate((0.1, 0.5, 1.2)):
        _save(sweep / f"member_{i}", _jumprelu(features, th, seed=i), cache)
    g = torch.Generator().manual_seed(0)
    _save(sweep / "member_topk", TopKSAE(D, 12, g, k=2), cache)
    (sweep / "member_unfinished").mkdir()
    (sweep / "member_unfinished" / "checkpoint.pt").write_bytes(b"")
    out = run_evaluation(_cfg(sweep))
    folder = sweep / "eval"
    csv_lines = (folder / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4
    assert "| name |" in (folder / "table.md").read_text()
    for name in ("frontier_l0_fvu.png", "firing_frequency.png", "error_by_position.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "member_topk" / "report.json").read_text())["reconstruction"]["l0"] <= 2.0
    l0s = [r["l0"] for r in sorted(out["rows"], key=lambda r: r["name"]) if r["name"] != "member_topk"]
    assert l0s[0] > l0s[1] > l0s[2]    # higher thresholds, fewer active latents
    assert any("member_unfinished" in n for n in out["reports"][0]["notes"])


def test_run_without_final_sae_is_a_clear_error(synthetic, tmp_path):
    root, cache, _, features = synthetic
    run = _save(tmp_path / "run", _jumprelu(features, 0.3), cache)
    (run / "sae.safetensors").unlink()
    with pytest.raises(RunError, match="no final SAE.*sae.safetensors"):
        run_evaluation(_cfg(run))


def test_cache_without_the_site_or_tokens_is_a_clear_error(synthetic, tmp_path):
    root, cache, x_all, features = synthetic
    other = write_cache(tmp_path / "other", {(1, "attn_out"): x_all}, context_length=CTX, chunk_rows=ROWS)
    run = _save(tmp_path / "run", _jumprelu(features, 0.3), other)
    with pytest.raises(ValueError, match="layer_1/mlp_out.*layer_1/attn_out"):
        run_evaluation(_cfg(run))
    shutil.rmtree(other / "tokens")
    with pytest.raises(ValueError, match="tokens"):
        run_evaluation(_cfg(run))


def test_width_mismatch_with_the_cache_is_a_clear_error(synthetic, tmp_path):
    root, cache, _, _ = synthetic
    g = torch.Generator().manual_seed(0)
    run = _save(tmp_path / "run", TopKSAE(D + 1, 12, g, k=2), cache)
    with pytest.raises(ValueError, match="width mismatch.*9.*8 wide"):
        run_evaluation(_cfg(run))


def test_cli_rejects_typos_and_evaluates(synthetic, tmp_path):
    root, cache, _, features = synthetic
    run = _save(tmp_path / "run", _jumprelu(features, 0.3), cache)
    repo = Path(__file__).resolve().parents[1]
    bad = subprocess.run([sys.executable, "-m", "evaluate", f"run={run}", "max_tokns=5"], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "max_tokns" in bad.stderr + bad.stdout
    assert not (run / "eval").exists()
    ok = subprocess.run([sys.executable, "-m", "evaluate", f"run={run}", "plots=false", "progress=false"],
                        cwd=repo, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (run / "eval" / "report.json").is_file()


def test_feature_recovery_against_numpy():
    from evaluate.features import feature_recovery
    rng = np.random.default_rng(0)
    features = rng.standard_normal((10, D))
    perm = rng.permutation(10)
    exact = feature_recovery(torch.from_numpy(3.0 * features[perm]).float(), features)
    assert exact["mean_max_cosine"] == pytest.approx(1.0, abs=1e-6) and exact["recovered_fraction"] == 1.0
    W_dec = rng.standard_normal((7, D))
    cos = (features / np.linalg.norm(features, axis=1, keepdims=True)) @ \
        (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)).T
    got = feature_recovery(torch.from_numpy(W_dec), features, threshold=0.5)
    assert got["mean_max_cosine"] == pytest.approx(cos.max(1).mean(), rel=1e-12)
    assert got["recovered_fraction"] == pytest.approx((cos.max(1) > 0.5).mean())

"""On synthetic activations with known sparse features, training recovers them (and the baselines train)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import train.config  # noqa: F401
from tests.cache_factory import sparse_feature_activations, write_cache
from train.cache_reader import heldout_sequences_of_cache
from train.cli import run_training
from train.run_folder import load_sae

CONF = str(Path(__file__).resolve().parent.parent / "conf")
D, N_FEATURES, ACTIVE, CTX = 32, 48, 3, 32


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    x, features, on = sparse_feature_activations(CTX * 2048, D, N_FEATURES, ACTIVE, seed=0)
    cache = write_cache(tmp_path_factory.mktemp("c") / "cache", {(0, "mlp_out"): x}, context_length=CTX,
                        chunk_rows=512)
    return cache, x, features, on


def cfg_for(cache, run_dir, *overrides, config="train"):
    base = [f"cache={cache}", "layer=0", "sublayer=mlp_out", f"run_dir={run_dir}", "train.progress=false",
            "train.tensorboard=false", "loader.batch_size=256", "loader.buffer_tokens=8192", "sae.width=96",
            "optim.lr=5e-3", "optim.lr_warmup_steps=20", "train.log_every_steps=20",
            "train.checkpoint_every_steps=0"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config, overrides=base + list(overrides))


def heldout_rows(cache, meta):
    seqs = heldout_sequences_of_cache(cache, meta["heldout"])
    rows = (seqs[:, None] * CTX + np.arange(1, CTX)).ravel()     # without BOS
    return rows


# The papers' recipe (unit-norm decoder, thresholds at the optimizer's lr), and the default (SAELens's
# step recipe in our units: free decoder, b_dec subtracted, thresholds at their own lr, conf/optim/jumprelu.yaml;
# with its constants in units of the median token norm and the pre-activation loss).
@pytest.mark.parametrize("recipe", [["sae=jumprelu_paper"], []], ids=["paper", "default"])
def test_jumprelu_recovers_true_features(synthetic, tmp_path, recipe):
    cache, x, features, on = synthetic
    run_training(cfg_for(cache, tmp_path / "run", "train.total_tokens=120000", "optim.lambda_warmup_steps=150",
                         "sae.sparsity_coeff=3e-2", "sae.theta_init=0.05", *recipe), single=True)
    sae, meta = load_sae(tmp_path / "run")
    W = sae.W_dec.detach().numpy()
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    best = (features @ W.T).max(1)                        # for each true feature, its closest decoder row
    assert best.mean() > 0.9, best
    rows = heldout_rows(cache, meta)                      # evaluate on the held-out sequences, raw units
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x[rows]))
    l0, true_l0 = (f > 0).sum(1).float().mean().item(), on[rows].sum(1).mean()
    assert abs(l0 - true_l0) < 0.3 * true_l0, (l0, true_l0)


def test_baselines_train(synthetic, tmp_path):
    cache, _, _, _ = synthetic
    members = ("[{preset:relu,sae:{sparsity_coeff:3e-2}},{preset:topk,sae:{k:3}},"
               "{preset:gated,sae:{sparsity_coeff:3e-2}},{preset:jumprelu_l1,sae:{sparsity_coeff:3e-2,theta_init:0.05}}]")
    final = run_training(cfg_for(cache, tmp_path / "abl", "train.total_tokens=40000", "optim.lambda_warmup_steps=60",
                                 "sweep=ablation", f"sweep.members={members}", config="train_sweep"), single=False)
    assert sorted(final) == ["gated", "jumprelu_l1", "relu", "topk"]
    for name, m in final.items():
        first = json.loads((tmp_path / "abl" / name / "metrics.jsonl").read_text().splitlines()[0])
        assert m["fvu"] < 0.3 and m["mse"] < first["mse"] / 3, (name, first, m)
        assert m["l0"] < 48 and m["dead"] < 96, (name, m)       # sparse codes, not all latents dead
    assert final["topk"]["l0"] <= 3

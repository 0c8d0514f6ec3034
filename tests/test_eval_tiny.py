"""`make eval` end to end on a harvest of the embedded (trained) Gemma 2: delta LM loss through the
model the cache records, against what must hold for a perfect and for a useless reconstruction."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from evaluate.config import EvalConfig
from evaluate.run_eval import run_evaluation
from tests.harvest_util import harvest_inprocess
from train.run_folder import save_sae
from train.sae import JumpReLUSAE

LAYER, SUBLAYER = 2, "mlp_out"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny") / "cache"
    harvest_inprocess(cache, [f"layers='{LAYER - 1},{LAYER}'", "sublayers=all"])
    return cache


def _width(cache, sublayer=SUBLAYER):
    stored = "resid_post" if sublayer == "resid_pre" else sublayer     # resid_pre of L is resid_post of L-1
    return zarr.open_group(str(cache), mode="r")[f"layer_{LAYER - 1}/{stored}"].shape[1]


def _run(folder, sae, cache, sublayer=SUBLAYER):
    save_sae(folder, sae, {"model": "embedded:tiny", "layer": LAYER, "sublayer": sublayer, "cache": str(cache),
                           "heldout": {"fraction": 0.25, "seed": 0}})
    return folder


def _identity_like(d):
    eye = torch.eye(d)
    return JumpReLUSAE.from_tensors(W_enc=torch.cat([eye, -eye], 1), W_dec=torch.cat([eye, -eye], 0),
                                    b_enc=torch.zeros(2 * d), b_dec=torch.zeros(d), threshold=torch.zeros(2 * d))


def _silent(d):
    """Never fires, decodes to zero: splicing it in is zero-ablation."""
    return JumpReLUSAE.from_tensors(W_enc=torch.zeros(d, 4), W_dec=torch.zeros(4, d), b_enc=torch.zeros(4),
                                    b_dec=torch.zeros(d), threshold=torch.ones(4))


def test_perfect_and_useless_reconstructions_on_the_tiny_model(tiny_cache, tmp_path):
    cfg = dict(progress=False, delta_lm_sequences=6, delta_lm_batch_sequences=4, plots=False)
    perfect = run_evaluation(EvalConfig(run=str(_run(tmp_path / "perfect", _identity_like(_width(tiny_cache)), tiny_cache)), **cfg))
    report = perfect["reports"][0]
    lm = report["delta_lm"]
    assert lm["n_sequences"] == 6
    assert abs(lm["delta_ce"]) < 1e-5 and lm["kl_spliced"] < 1e-6
    # the trained model needs this site: removing it, or keeping only its mean, raises the loss
    assert lm["ce_zero"] > lm["ce_clean"] + 0.05 and lm["ce_mean"] > lm["ce_clean"] + 0.02
    assert lm["fraction_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert report["reconstruction"]["fvu"] < 1e-10
    assert json.loads((tmp_path / "perfect" / "eval" / "report.json").read_text())["delta_lm"] == lm

    useless = run_evaluation(EvalConfig(run=str(_run(tmp_path / "silent", _silent(_width(tiny_cache)), tiny_cache)), **cfg))
    lm0 = useless["reports"][0]["delta_lm"]
    assert lm0["ce_spliced"] == pytest.approx(lm0["ce_zero"], abs=1e-6)
    assert lm0["ce_clean"] == pytest.approx(lm["ce_clean"], abs=1e-9)
    assert lm0["fraction_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert useless["reports"][0]["reconstruction"]["l0"] == 0
    assert useless["reports"][0]["reconstruction"]["dead_fraction"] == 1.0


def test_ablation_command_on_the_tiny_model(tiny_cache, tmp_path):
    """`make ablation` on the tiny setup: one sweep, delta LM loss through the model, table and plot."""
    arms = ("arms=[{preset:jumprelu,levels:[1e-3,1e-2]},{preset:jumprelu_l1,levels:[1e-2,1e-1]},"
            "{preset:relu,levels:[1e-2,1e-1]},{preset:topk,knob:k,levels:[8,24]},{preset:gated,levels:[1e-2,1e-1]}]")
    small = ("budgets.small=['train.total_tokens=16384','loader.batch_size=512','loader.buffer_tokens=2048',"
             "'optim.lr=2e-3','optim.lr_warmup_steps=4','optim.lambda_warmup_steps=10',"
             "'train.checkpoint_every_steps=0','train.log_every_steps=8','train.tensorboard=false',"
             "'train.progress=false','loader.heldout_fraction=0.1','sae.width=128']")
    run_dir = tmp_path / "ablation"
    done = subprocess.run([sys.executable, "-m", "evaluate.ablation", f"cache={tiny_cache}", f"layer={LAYER}",
                           f"sublayer={SUBLAYER}", f"run_dir={run_dir}", arms, small, "eval.progress=false",
                           "eval.delta_lm_sequences=2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = run_dir / "eval"
    assert (folder / "ablation_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "frontier_l0_delta_lm_loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((folder / "ablation.json").read_text())["rows"]
    assert len(rows) == 10 and len((folder / "table.csv").read_text().splitlines()) == 11
    assert all(math.isfinite(r["delta_ce"]) and math.isfinite(r["kl_spliced"]) for r in rows)
    assert "delta_ce" in {c["metric"] for c in json.loads((folder / "ablation.json").read_text())["comparisons"]}


@pytest.mark.parametrize("sublayer", ["resid_pre", "attn_z", "attn_out", "resid_mid", "resid_post"])
def test_every_site_splices_back_losslessly(tiny_cache, tmp_path, sublayer):
    """A perfect reconstruction at any site (resid_pre read from layer L-1's resid_post) changes nothing."""
    out = run_evaluation(EvalConfig(run=str(_run(tmp_path / sublayer, _identity_like(_width(tiny_cache, sublayer)), tiny_cache, sublayer)),
                                    progress=False, delta_lm_sequences=4, plots=False))
    report = out["reports"][0]
    assert report["reconstruction"]["fvu"] < 1e-10
    assert abs(report["delta_lm"]["delta_ce"]) < 1e-5 and report["delta_lm"]["kl_spliced"] < 1e-6
    assert report["delta_lm"]["kl_zero"] > 1e-6          # and zeroing the site does change the output

"""`make eval` end to end on a harvest of the embedded tiny Gemma 2: delta LM loss through the model
the cache records, against what must hold for a perfect and for a useless reconstruction."""
import json

import pytest
import torch

from evaluate.config import EvalConfig
from evaluate.run_eval import run_evaluation
from tests.harvest_util import harvest_inprocess
from train.run_folder import save_sae
from train.sae import JumpReLUSAE

LAYER, SUBLAYER = 2, "mlp_out"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny") / "cache"
    harvest_inprocess(cache, [f"layers={LAYER}", f"sublayers={SUBLAYER}"])
    return cache


def _run(folder, sae, cache):
    save_sae(folder, sae, {"model": "embedded:tiny", "layer": LAYER, "sublayer": SUBLAYER, "cache": str(cache),
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
    perfect = run_evaluation(EvalConfig(run=str(_run(tmp_path / "perfect", _identity_like(64), tiny_cache)), **cfg))
    report = perfect["reports"][0]
    lm = report["delta_lm"]
    assert lm["n_sequences"] == 6
    assert abs(lm["delta_ce"]) < 1e-5 and lm["kl_spliced"] < 1e-6
    assert abs(lm["ce_zero"] - lm["ce_clean"]) > 1e-4   # the site matters (random weights: either way)
    assert report["reconstruction"]["fvu"] < 1e-10
    assert json.loads((tmp_path / "perfect" / "eval" / "report.json").read_text())["delta_lm"] == lm

    useless = run_evaluation(EvalConfig(run=str(_run(tmp_path / "silent", _silent(64), tiny_cache)), **cfg))
    lm0 = useless["reports"][0]["delta_lm"]
    assert lm0["ce_spliced"] == pytest.approx(lm0["ce_zero"], abs=1e-6)
    assert lm0["ce_clean"] == pytest.approx(lm["ce_clean"], abs=1e-9)
    assert lm0["fraction_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert useless["reports"][0]["reconstruction"]["l0"] == 0
    assert useless["reports"][0]["reconstruction"]["dead_fraction"] == 1.0

"""Every SAE the evaluation loads feeds the browser: run folders, Gemma Scope params.npz, SAELens
folders (written by SAELens itself or by our export). SAELens folders are read into modules that
compute what SAELens computes."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluate.browser.build import build_browser
from evaluate.browser.config import FeaturesConfig
from evaluate.config import EvalConfig, ExportConfig
from evaluate.export import export
from evaluate.run_eval import run_evaluation
from evaluate.sources import RunError, resolve
from tests.cache_factory import write_cache
from tests.test_eval_features_cache import calibrated_jumprelu
from train.run_folder import save_sae

pytestmark = pytest.mark.filterwarnings("ignore:.*records no model")

D, W, CTX = 8, 40, 16


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    x = np.random.default_rng(0).standard_normal((32 * CTX, D)).astype(np.float32) * 3
    cache = write_cache(root / "cache", {(1, "resid_post"): x}, context_length=CTX, chunk_rows=4 * CTX)
    sae = calibrated_jumprelu(torch.from_numpy(x), W, firing=0.05)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(W, generator=torch.Generator().manual_seed(1)))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=torch.Generator().manual_seed(2)))
    run = root / "run"
    save_sae(run, sae, {"model": "synthetic", "layer": 1, "sublayer": "resid_post", "cache": str(cache),
                        "heldout": {"fraction": 0.5, "seed": 0}})
    return root, run, cache


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "data").glob("shard_*.js"))}


def test_the_browser_of_an_exported_sae_equals_that_of_its_run(synthetic):
    root, run, cache = synthetic
    ours = build_browser(FeaturesConfig(run=str(run), progress=False, shard_latents=16))
    assert ours == run / "features"
    npz = export(ExportConfig(run=str(run), format="gemmascope", out=str(root / "gs")))
    sl = export(ExportConfig(run=str(run), format="saelens", out=str(root / "sl")))
    from_npz = build_browser(FeaturesConfig(run=str(npz / "params.npz"), progress=False, shard_latents=16))
    from_sl = build_browser(FeaturesConfig(run=str(sl), progress=False, shard_latents=16))
    assert from_npz == npz / "features" and from_sl == sl / "features"
    assert _shards(from_npz) == _shards(ours) == _shards(from_sl)
    assert len(_shards(ours)) == 3 and any(b'"top":[{' in b for b in _shards(ours).values())
    meta = json.loads((from_sl / "features.json").read_text())
    assert (meta["layer"], meta["sublayer"], meta["cache"]) == (1, "resid_post", str(cache))


def _saelens_folder(path, architecture, centred, seed=0, **extra):
    """A random SAE of SAELens itself, saved by SAELens (`save_model`)."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg = {"architecture": architecture, "d_in": D, "d_sae": W, "apply_b_dec_to_input": centred, "dtype": "float32",
           "device": "cpu", "metadata": {"hook_name": "blocks.1.hook_resid_post", "model_name": "foreign"}, **extra}
    sae = sae_lens.SAE.from_dict(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(0.2 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (0.5 if name == "W_enc" else 0.0))
    sae.save_model(path)
    return sae


@pytest.mark.parametrize("architecture, extra", [("jumprelu", {}), ("standard", {}), ("topk", {"k": 5}),
                                                 ("gated", {})])
@pytest.mark.parametrize("centred", [True, False])
def test_folders_saelens_writes_load_as_modules_computing_the_same(synthetic, tmp_path, architecture, extra, centred):
    root, run, cache = synthetic
    theirs = _saelens_folder(tmp_path / "sl", architecture, centred, **extra)
    settings = SimpleNamespace(run=str(tmp_path / "sl"), cache=str(cache), layer=None, sublayer=None,
                               heldout_fraction=None, heldout_seed=None)
    (target,), is_sweep = resolve(settings)
    assert not is_sweep and (target.layer, target.sublayer) == (1, "resid_post")
    assert target.meta["label"] == f"saelens-{architecture}"
    x = 3 * torch.randn(64, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(x), target.sae.encode(x)
        assert torch.equal(f_theirs != 0, f_ours != 0) and 0 < int((f_ours != 0).sum()) < f_ours.numel()
        torch.testing.assert_close(f_ours, f_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target.sae.decode(f_ours), theirs.decode(f_theirs), rtol=1e-5, atol=1e-5)


def test_a_saelens_folder_evaluates_and_is_refused_clearly_when_it_cannot_be(synthetic, tmp_path):
    root, run, cache = synthetic
    _saelens_folder(tmp_path / "sl", "jumprelu", True)
    with pytest.raises(RunError, match="records no cache"):
        run_evaluation(EvalConfig(run=str(tmp_path / "sl"), progress=False, plots=False))
    out = run_evaluation(EvalConfig(run=str(tmp_path / "sl"), cache=str(cache), heldout_fraction=0.25,
                                    progress=False, plots=False))
    assert out["reports"][0]["label"] == "saelens-jumprelu" and out["reports"][0]["saebench"]["sparsity"]["l0"] > 0
    browser = build_browser(FeaturesConfig(run=str(tmp_path / "sl"), cache=str(cache), heldout_fraction=0.25,
                                           progress=False))
    assert (browser / "index.html").is_file()

    cfg_file = tmp_path / "sl" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(RunError, match="normalize_activations='expected_average_only_in'.*fold"):
        build_browser(FeaturesConfig(run=str(tmp_path / "sl"), cache=str(cache), progress=False))
    cfg_file.write_text(json.dumps({**cfg, "architecture": "batchtopk"}))
    with pytest.raises(RunError, match="'batchtopk' has no equivalent"):
        build_browser(FeaturesConfig(run=str(tmp_path / "sl"), cache=str(cache), progress=False))

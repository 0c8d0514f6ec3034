"""`make export`: Gemma Scope params.npz and SAELens folders give the same outputs as our SAE."""
import json

import numpy as np
import pytest
import torch

from evaluate.config import EvalConfig, ExportConfig
from evaluate.export import ExportError, export
from evaluate.gemmascope import GemmaScopeError, KEYS, load_params_npz
from evaluate.run_eval import run_evaluation
from evaluate.sources import RunError
from tests.cache_factory import sparse_feature_activations, write_cache
from train.run_folder import load_sae, save_sae
from train.sae import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

# Synthetic caches record no model: delta LM loss is skipped, with this warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*records no model")

D, W, CTX = 8, 24, 16
C = 3.7   # normalisation constant: raw activations are C times the normalised ones


def _perturbed(sae, seed):
    """Random non-trivial parameters (biases, thresholds, magnitudes), as if trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name in ("raw_threshold", "log_threshold"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.01)
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return sae


def _normalised_sae(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = {"jumprelu": lambda: JumpReLUSAE(D, W, g), "relu": lambda: ReLUSAE(D, W, g),
           "topk": lambda: TopKSAE(D, W, g, k=4), "gated": lambda: GatedSAE(D, W, g),
           "batchtopk": lambda: BatchTopKSAE(D, W, g, k=4)}[arch]()
    if arch == "batchtopk":          # its inference threshold, learnt in training: one for every latent
        sae.threshold.fill_(0.15)
    return _perturbed(sae, seed)


def _raw_inputs(n=64):
    return C * torch.randn(n, D, generator=torch.Generator().manual_seed(5))


@pytest.fixture()
def run_of(tmp_path):
    cache = tmp_path / "cache"
    x, _, _ = sparse_feature_activations(32 * CTX, D, n_features=10, active=2.0, seed=1)
    write_cache(cache, {(3, "mlp_out"): C * x}, context_length=CTX, chunk_rows=4 * CTX)

    def make(arch):
        normalised = _normalised_sae(arch)
        run = tmp_path / f"run_{arch}"
        save_sae(run, normalised.folded(C), {"model": "google/gemma-2-2b", "layer": 3, "sublayer": "mlp_out",
                                             "cache": str(cache), "heldout": {"fraction": 0.25, "seed": 0}})
        return run, normalised
    return make


def _export(run, fmt, out, **kw):
    return export(ExportConfig(run=str(run), format=fmt, out=str(out), **kw))


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "batchtopk"])
def test_gemmascope_round_trip_is_exact(run_of, tmp_path, arch):
    run, normalised = run_of(arch)
    ours, _ = load_sae(run)
    out = _export(run, "gemmascope", tmp_path / "gs")
    with np.load(out / "params.npz") as npz:
        assert sorted(npz.files) == sorted(KEYS)
        assert all(npz[k].dtype == np.float32 for k in KEYS)
        assert npz["W_enc"].shape == (D, W) and npz["W_dec"].shape == (W, D) and npz["threshold"].shape == (W,)
        np.testing.assert_array_equal(npz["W_enc"], ours.W_enc.detach().numpy())
    back = load_params_npz(out / "params.npz")
    x = _raw_inputs()
    with torch.no_grad():
        assert torch.equal(back.encode(x), ours.encode(x))
        assert torch.equal(back(x), ours(x))
        # Folding: on raw inputs, C times what the trained SAE gives on the normalised ones.
        torch.testing.assert_close(back(x), C * normalised(x / C), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.encode(x), C * normalised.encode(x / C), rtol=1e-5, atol=1e-5)
    provenance = json.loads((out / "provenance.json").read_text())
    assert (provenance["layer"], provenance["sublayer"]) == (3, "mlp_out")


def test_exported_params_evaluate_like_the_run(run_of, tmp_path):
    run, _ = run_of("jumprelu")
    out = _export(run, "gemmascope", tmp_path / "gs")
    ours = run_evaluation(EvalConfig(run=str(run), progress=False, plots=False))["reports"][0]
    theirs = run_evaluation(EvalConfig(run=str(out / "params.npz"), progress=False, plots=False))["reports"][0]
    assert theirs["reconstruction"] == ours["reconstruction"]
    assert (tmp_path / "gs" / "eval" / "report.json").is_file()


def test_gemmascope_refuses_what_it_cannot_hold(run_of, tmp_path):
    run, _ = run_of("topk")
    with pytest.raises(GemmaScopeError, match="topk.*saelens"):
        _export(run, "gemmascope", tmp_path / "gs")
    assert not (tmp_path / "gs").exists()


def test_export_never_overwrites_unasked(run_of, tmp_path):
    run, _ = run_of("jumprelu")
    out = tmp_path / "gs"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        _export(run, "gemmascope", out)
    assert (out / "keep.txt").read_text() == "mine"
    _export(run, "gemmascope", out, overwrite=True)
    assert (out / "params.npz").is_file() and not (out / "keep.txt").exists()
    with pytest.raises(ExportError, match="format='npz'"):
        _export(run, "npz", tmp_path / "other")


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "topk", "gated", "batchtopk"])
def test_saelens_loads_the_export_with_identical_outputs(run_of, tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    run, normalised = run_of(arch)
    ours, _ = load_sae(run)
    out = _export(run, "saelens", tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    cfg = json.loads((out / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_mlp_out"
    assert meta["model_name"] == "google/gemma-2-2b"
    assert meta["context_size"] == CTX
    assert meta["dataset_path"] is not None
    x = _raw_inputs()
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert torch.equal(f_theirs != 0, f_ours != 0)
        torch.testing.assert_close(f_theirs, f_ours, rtol=0, atol=0)
        torch.testing.assert_close(theirs.decode(f_theirs), ours.decode(f_ours), rtol=0, atol=0)
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
        torch.testing.assert_close(theirs(x), C * normalised(x / C), rtol=1e-5, atol=1e-5)


def test_released_params_npz_needs_its_site_and_evaluates_beside_ours(run_of, tmp_path):
    """A Gemma Scope file as DeepMind releases it: params.npz alone, the site given on the command line."""
    run, _ = run_of("jumprelu")
    out = _export(run, "gemmascope", tmp_path / "gs")
    released = tmp_path / "released" / "layer_3" / "width_24" / "average_l0_5"
    released.mkdir(parents=True)
    (out / "params.npz").rename(released / "params.npz")
    with pytest.raises(RunError, match="records no layer, sublayer, cache: pass layer=... sublayer=... cache=..."):
        run_evaluation(EvalConfig(run=str(released / "params.npz"), progress=False, plots=False))
    cache = json.loads((run / "sae.json").read_text())["cache"]
    theirs = run_evaluation(EvalConfig(run=str(released / "params.npz"), cache=cache, layer=3, sublayer="mlp_out",
                                       heldout_fraction=0.25, progress=False, plots=False))
    ours = run_evaluation(EvalConfig(run=str(run), progress=False, plots=False))
    assert theirs["reports"][0]["reconstruction"] == ours["reports"][0]["reconstruction"]
    assert (released / "eval" / "report.json").is_file()
    with pytest.raises(RunError, match="trained on layer=3 but layer=4"):
        run_evaluation(EvalConfig(run=str(run), layer=4, progress=False, plots=False))


def test_export_of_a_sweep_folder_names_its_members(run_of, tmp_path):
    import shutil
    run, _ = run_of("relu")
    sweep = tmp_path / "sweep"
    shutil.copytree(run, sweep / "member_a")
    with pytest.raises(ExportError, match="sweep folder.*member_a"):
        _export(sweep, "saelens", tmp_path / "out")


def test_saelens_attn_z_export_takes_transformerlens_head_shaped_inputs(tmp_path):
    """attn_z is the flattening of TransformerLens's hook_z [..., n_heads, d_head]: SAELens reshapes it."""
    sae_lens = pytest.importorskip("sae_lens")
    ours = _perturbed(JumpReLUSAE(D, W, torch.Generator().manual_seed(0)), 0).folded(C)
    save_sae(tmp_path / "run", ours, {"model": "google/gemma-2-2b", "layer": 5, "sublayer": "attn_z",
                                      "cache": str(tmp_path / "no_cache"), "heldout": {"fraction": 0.1, "seed": 0}})
    out = _export(tmp_path / "run", "saelens", tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert json.loads((out / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.5.attn.hook_z"
    heads = _raw_inputs().view(-1, 2, D // 2)                    # [tokens, n_heads, d_head]
    with torch.no_grad():
        f = theirs.encode(heads)
        torch.testing.assert_close(f, ours.encode(heads.flatten(1)), rtol=0, atol=0)
        torch.testing.assert_close(theirs.decode(f), ours(heads.flatten(1)).view_as(heads), rtol=0, atol=0)


def test_params_npz_keeps_our_label_and_a_release_gets_its_own(run_of, tmp_path):
    run, _ = run_of("relu")
    out = _export(run, "gemmascope", tmp_path / "gs")
    ours = run_evaluation(EvalConfig(run=str(out), progress=False, plots=False, delta_lm_sequences=0))
    assert ours["reports"][0]["label"] == "relu+l1"
    (out / "provenance.json").unlink()
    cache = json.loads((run / "sae.json").read_text())["cache"]
    released = run_evaluation(EvalConfig(run=str(out), cache=cache, layer=3, sublayer="mlp_out", heldout_fraction=0.25,
                                         progress=False, plots=False, delta_lm_sequences=0))
    assert released["reports"][0]["label"] == "gemma-scope"


def test_a_release_side_by_side_with_our_run(run_of, tmp_path):
    """compare=[...]: a released params.npz on the run's cache, site and held-out sequences, one table."""
    run, _ = run_of("jumprelu")
    out = _export(run, "gemmascope", tmp_path / "gs")
    (out / "provenance.json").unlink()
    both = run_evaluation(EvalConfig(run=str(run), compare=[str(out / "params.npz")], out=str(tmp_path / "side"),
                                     progress=False, delta_lm_sequences=0))
    ours, released = both["reports"]
    assert (ours["label"], released["label"]) == ("jumprelu+l0", "gemma-scope")
    assert released["reconstruction"] == ours["reconstruction"]      # the same SAE, the same tokens
    assert len((tmp_path / "side" / "table.csv").read_text().splitlines()) == 3
    assert (tmp_path / "side" / "frontier_l0_fvu.png").is_file()

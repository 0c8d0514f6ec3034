"""Bad input fails with a clear error before any work, and leaves an existing cache untouched."""
from __future__ import annotations

import shutil

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from harvest.cache_layout import CacheMismatch, ForeignCacheLocation
from harvest.config import HarvestConfigError
from harvest.model import ModelLoadError
from harvest.packing import CorpusTooSmall
from harvest.run import DiskSpaceError
from harvest.sites import SiteError
from tests.harvest_util import harvest_cli, harvest_config, harvest_inprocess, tree_digest


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    cache = tmp_path_factory.mktemp("existing") / "cache"
    harvest_inprocess(cache)
    return cache


@pytest.fixture
def cache(existing, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(existing, copy)
    return copy


@pytest.mark.parametrize("overrides, error, message", [
    (["sublayers=mlp_output"], SiteError, "unknown sublayer.*mlp_output.*resid_pre"),
    (["layers=4"], SiteError, r"out of range.*layers 0\.\.3"),
    (["layers='2-9'"], SiteError, r"out of range"),
    (["model=custom", "model.path=/no/such/checkpoint"], ModelLoadError, "cannot load model '/no/such/checkpoint'"),
    (["seed=1"], CacheMismatch, "(?s)different configuration.*harvest_config.seed: the cache has 0, this run asks for 1"),
    (["chunk_tokens=1024"], CacheMismatch, "chunk_rows: the cache has 512"),
    (["sublayers=mlp_out"], CacheMismatch, "sites"),
    (["min_free_bytes=1000000000000000000"], DiskSpaceError, "not enough disk space"),
    (["codec=lz4"], HarvestConfigError, "codec='lz4': choose one of none, zstd, blosc"),
    (["storage_dtype=fp8"], HarvestConfigError, "storage_dtype"),
    (["context_length=1"], HarvestConfigError, "at least 2"),
])
def test_bad_input_leaves_existing_cache_untouched(cache, overrides, error, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree_digest(cache)
    with pytest.raises(error, match=message):
        harvest_inprocess(cache, overrides)
    assert tree_digest(cache) == before


def test_corpus_too_small_for_one_sequence(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("Far too short for sixty-four tokens.")
    with pytest.raises(CorpusTooSmall, match="does not fill one sequence of 64 tokens"):
        harvest_inprocess(tmp_path / "new", ["data=local", f"data.path={corpus}"])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("overrides, error", [
    (["min_free_bytes=1000000000000000000"], DiskSpaceError),
    (["codec=lz4"], HarvestConfigError),
])
def test_refused_before_creating_anything(tmp_path, overrides, error):
    with pytest.raises(error):
        harvest_inprocess(tmp_path / "new", overrides)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("overrides, error", [
    (["model=gemma-3-1b"], ConfigCompositionException),       # not a name in conf/model/
    (["batch_sise=4"], ConfigCompositionException),           # typo in a key
    (["n_tokens=lots"], ConfigCompositionException),          # wrong type
])
def test_config_errors_before_any_work(tmp_path, overrides, error):
    with pytest.raises((error, ConfigKeyError, ValidationError)):
        harvest_config([f"cache={tmp_path / 'new'}", *overrides])


def test_cli_reports_error_without_traceback(tmp_path):
    result = harvest_cli(tmp_path / "new", ["sublayers=bogus"])
    assert result.returncode == 2
    assert "error: unknown sublayer(s) ['bogus']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()


def test_changed_weights_under_the_same_path_are_refused(tmp_path):
    import torch
    from transformers import Gemma2ForCausalLM
    from harvest.model import checkpoint_location
    cfg = harvest_config([]).model
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint_location(cfg), folder)
    model_args = ["model=custom", f"model.path={folder}", "model.context_length=64", "layers=0"]
    harvest_inprocess(tmp_path / "cache", model_args)
    before = tree_digest(tmp_path / "cache")
    model = Gemma2ForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    model.save_pretrained(folder)
    with pytest.raises(CacheMismatch, match="checkpoint_hash"):
        harvest_inprocess(tmp_path / "cache", model_args)
    assert tree_digest(tmp_path / "cache") == before


def test_folder_of_other_files_is_refused_and_left_untouched(tmp_path):
    """CACHE=/etc and the like: a folder that holds other files and no cache gets nothing written."""
    folder = tmp_path / "etc"
    (folder / "conf.d").mkdir(parents=True)
    (folder / "hosts").write_text("127.0.0.1 localhost\n")
    (folder / "conf.d" / "a.conf").write_text("x = 1\n")
    before = tree_digest(folder)
    with pytest.raises(ForeignCacheLocation, match=r"already holds 2 entries and no cache \(conf\.d/, hosts\)"):
        harvest_inprocess(folder)
    assert tree_digest(folder) == before and sorted(p.name for p in folder.iterdir()) == ["conf.d", "hosts"]
    result = harvest_cli(folder)
    assert result.returncode == 2 and "no cache (conf.d/, hosts)" in result.stderr and "Traceback" not in result.stderr
    assert tree_digest(folder) == before


def test_cache_that_is_a_file_or_a_foreign_zarr_group_is_refused(tmp_path):
    import zarr
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ForeignCacheLocation, match="is a file, not a folder"):
        harvest_inprocess(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a folder"
    zarr.create_group(store=str(tmp_path / "other"), attributes={"made_by": "someone else"})
    before = tree_digest(tmp_path / "other")
    with pytest.raises(CacheMismatch, match="not a jumpscope cache"):
        harvest_inprocess(tmp_path / "other")
    assert tree_digest(tmp_path / "other") == before


def test_empty_folder_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    harvest_inprocess(tmp_path / "empty", ["n_tokens=512", "layers=0", "sublayers=mlp_out"])
    assert (tmp_path / "empty" / "zarr.json").exists()

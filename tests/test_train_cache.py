"""Reading caches through the format alone, and the errors on bad caches."""
import numpy as np
import pytest
import zarr

from tests.cache_factory import stored_as_float, write_cache
from train.cache_reader import (CacheError, complete_heldout_sequences, heldout_sequences,
                                heldout_sequences_of_cache, open_activations)


@pytest.fixture()
def cache(tmp_path):
    rng = np.random.default_rng(0)
    acts = {(0, "resid_post"): rng.standard_normal((128, 4)), (1, "mlp_out"): rng.standard_normal((128, 4)),
            (1, "attn_z"): rng.standard_normal((128, 6))}
    return write_cache(tmp_path / "cache", acts, context_length=8, chunk_rows=32, incomplete=[1])


def test_missing_array_lists_what_the_cache_holds(cache):
    with pytest.raises(CacheError) as e:
        open_activations(cache, 3, "mlp_out")
    for name in ("layer_0/resid_post", "layer_1/mlp_out", "layer_1/attn_z"):
        assert name in str(e.value)
    with pytest.raises(CacheError, match="layer_2/resid_pre.*layer_1/resid_post"):
        open_activations(cache, 2, "resid_pre")


def test_resid_pre_resolves_to_previous_resid_post(cache):
    src = open_activations(cache, 1, "resid_pre")
    assert src.name == "layer_0/resid_post" and src.width == 4


def test_complete_flags_and_statistics(cache):
    src = open_activations(cache, 1, "attn_z")
    assert src.complete.tolist() == [True, False, True, True]
    assert src.width == 6 and src.n_sequences == 16 and src.storage_dtype == "bfloat16"
    est = src.estimate_mean_squared_norm()
    assert est == pytest.approx(src.mean_squared_norm, rel=1e-6)   # same non-BOS rows of complete chunks


def test_newer_format_version_is_refused(tmp_path):
    path = write_cache(tmp_path / "c", {(0, "mlp_out"): np.ones((16, 2))}, context_length=8, chunk_rows=16,
                       format_version=2)
    with pytest.raises(CacheError, match="format version 2"):
        open_activations(path, 0, "mlp_out")


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="no cache"):
        open_activations(tmp_path / "nothing", 0, "mlp_out")
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(CacheError, match="format_version"):
        open_activations(tmp_path / "g", 0, "mlp_out")


def test_heldout_rule_is_reproducible(cache):
    a = heldout_sequences(16, 0.25, 3)
    assert len(a) == 4 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, heldout_sequences_of_cache(cache, {"fraction": 0.25, "seed": 3}))
    assert not np.array_equal(a, heldout_sequences(16, 0.25, 4))
    src = open_activations(cache, 1, "mlp_out")
    readable = complete_heldout_sequences(src, {"fraction": 0.25, "seed": 3})
    assert set(readable) == {s for s in a if s // 4 != 1}       # sequences 4..7 are in incomplete chunk 1


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_chunk_reads_into_buffers_match_zarr(tmp_path, codec):
    acts = np.random.default_rng(2).standard_normal((96, 5)).astype(np.float32)
    path = write_cache(tmp_path / "c", {(0, "mlp_out"): acts}, context_length=8, chunk_rows=32, codec=codec)
    src = open_activations(path, 0, "mlp_out")
    assert src.raw_layout == (codec is None)       # bare chunk files are read straight into the buffer
    for c in range(3):
        out = np.empty((32, 5), dtype=np.uint16)
        src.read_chunk_into(c, out)
        np.testing.assert_array_equal(out, src.read_chunk_numpy(c))
        np.testing.assert_array_equal(src.as_tensor(out).float().numpy(),
                                      stored_as_float(acts, "bfloat16")[c * 32:(c + 1) * 32])

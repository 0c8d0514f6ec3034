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
    # the median token norm (sae.constants_unit=median_norm): the sample is every complete chunk here
    rows = np.concatenate([src.read_rows(32 * c, 32 * c + 32).float().numpy() for c in (0, 2, 3)])
    rows = rows[np.arange(len(rows)) % 8 != 0]
    assert src.estimate_median_norm() == pytest.approx(np.median(np.linalg.norm(rows.astype(np.float64), axis=1)),
                                                       rel=1e-12)


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


@pytest.mark.parametrize("pattern", ["identity", "permuted", "bos_and_holes", "reversed_runs"])
def test_scatter_read_puts_every_row_where_its_slot_says(tmp_path, pattern):
    """preadv scatter reads against numpy fancy indexing: rows skipped singly (into scratch) and in
    long runs (seeked over), more runs than IOV_MAX per call, a destination larger than the file."""
    from train import scatter_read as sr
    if not sr.available():
        pytest.skip("no preadv in this libc")
    rng = np.random.default_rng(0)
    rows, width = 3000, 7
    data = rng.integers(0, 2 ** 16, size=(rows, width), dtype=np.uint16)
    path = tmp_path / "rows.bin"
    path.write_bytes(b"xyz" + data.tobytes())           # a 3-byte header: file_offset is honoured
    slots = np.arange(rows)
    if pattern == "permuted":
        slots = rng.permutation(rows)
    elif pattern == "bos_and_holes":
        slots = rng.permutation(rows + 50)[:rows]
        slots[::100] = -1                                # one row in 100 skipped (scratch)
        slots[1000:1400] = -1                            # a long skipped run (a hole between calls)
        slots[2990:] = -1                                # skipped tail
    elif pattern == "reversed_runs":
        slots = (np.arange(rows) // 10 * 10)[::-1] + np.arange(rows) % 10
    out = np.full((rows + 50, width), 0xDEAD, dtype=np.uint16)
    with open(path, "rb", buffering=0) as f:
        assert sr.scatter_read(f.fileno(), slots, out, file_offset=3)
    want = np.full_like(out, 0xDEAD)
    keep = slots >= 0
    want[slots[keep]] = data[keep]
    np.testing.assert_array_equal(out, want)


def test_window_scatter_plans_match_per_file_reads(tmp_path):
    """A window's plans made at once (the loader's planner thread, one numpy pass over all files) put
    each file's rows where per-file scatter_read would, into one shared buffer; a plan refuses a
    buffer of another row size or too few rows."""
    from train import scatter_read as sr
    if not sr.available():
        pytest.skip("no preadv in this libc")
    rng = np.random.default_rng(1)
    files, rows, width = 4, 500, 6
    data = rng.integers(0, 2 ** 16, size=(files, rows, width), dtype=np.uint16)
    slots = rng.permutation(files * rows + 20)[:files * rows].reshape(files, rows)
    slots[:, 0] = -1                                     # BOS rows
    slots[2, 100:300] = -1                               # a held-out stretch (a hole)
    plans = sr.plan_scatter(slots, width * 2)
    out = np.full((files * rows + 20, width), 7, dtype=np.uint16)
    want = out.copy()
    for f in range(files):
        path = tmp_path / f"{f}.bin"
        path.write_bytes(data[f].tobytes())
        with open(path, "rb", buffering=0) as fh:
            assert sr.run_scatter(fh.fileno(), plans[f], out)
        keep = slots[f] >= 0
        want[slots[f][keep]] = data[f][keep]
    np.testing.assert_array_equal(out, want)
    with open(tmp_path / "0.bin", "rb", buffering=0) as fh:
        with pytest.raises(ValueError):
            sr.run_scatter(fh.fileno(), plans[0], np.zeros((files * rows + 20, width + 1), np.uint16))
        with pytest.raises(IndexError):
            sr.run_scatter(fh.fileno(), plans[0], np.zeros((10, width), np.uint16))


def test_scatter_read_reports_a_short_file(tmp_path):
    from train import scatter_read as sr
    if not sr.available():
        pytest.skip("no preadv in this libc")
    path = tmp_path / "short.bin"
    path.write_bytes(np.arange(30, dtype=np.uint16).tobytes())   # 10 rows of 3
    out = np.zeros((12, 3), dtype=np.uint16)
    with open(path, "rb", buffering=0) as f:
        assert not sr.scatter_read(f.fileno(), np.arange(12), out)
    with pytest.raises(IndexError):
        with open(path, "rb", buffering=0) as f:
            sr.scatter_read(f.fileno(), np.array([0, 12]), out)


@pytest.mark.parametrize("codec", [None, "zstd"])
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_complete_chunk_with_a_missing_or_short_file_is_refused(tmp_path, codec, damage):
    """zarr reads a missing chunk as zeros; the trainer must refuse instead of training on them."""
    acts = np.random.default_rng(3).standard_normal((96, 5)).astype(np.float32)
    path = write_cache(tmp_path / "c", {(0, "mlp_out"): acts}, context_length=8, chunk_rows=32, codec=codec)
    src = open_activations(path, 0, "mlp_out")
    victim = src.chunk_path(1)
    if damage == "delete":
        victim.unlink()
    else:
        if codec is not None:
            pytest.skip("a truncated compressed chunk fails in its codec, not here")
        victim.write_bytes(victim.read_bytes()[:100])
    out = np.empty((32, 5), dtype=np.uint16)
    src.read_chunk_into(0, out)                                   # the intact chunks still read
    with pytest.raises(CacheError, match="chunk 1 of layer_0/mlp_out is marked complete"):
        src.read_chunk_into(1, out)

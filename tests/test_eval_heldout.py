"""Held-out sequences read back: the rows of exactly those sequences, whichever chunk layout."""
import numpy as np
import pytest
import zarr

from evaluate.heldout import heldout_batches
from tests.cache_factory import write_cache
from train.cache_reader import open_activations

CTX, ROWS, N_CHUNKS = 8, 32, 4


@pytest.mark.parametrize("codec", [None, "zstd"])
def test_heldout_batches_hold_exactly_the_asked_sequences(tmp_path, codec):
    n = ROWS * N_CHUNKS
    acts = np.random.default_rng(0).standard_normal((n, 6)).astype(np.float32)
    path = write_cache(tmp_path / "c", {(0, "mlp_out"): acts}, context_length=CTX, chunk_rows=ROWS, codec=codec)
    source = open_activations(path, 0, "mlp_out")
    group = zarr.open_group(str(path), mode="r")
    stored = group["layer_0/mlp_out"][:]
    tokens = group["tokens"][:]
    # several sequences in one chunk, one alone in another, unsorted, batches that split a chunk's sequences
    seqs = np.array([1, 2, 3, 9, 0, 15, 14])
    got = list(heldout_batches(source, seqs, batch_sequences=3))
    assert [len(t) for t, _ in got] == [3, 3, 1]
    toks = np.concatenate([t.numpy() for t, _ in got])
    values = np.concatenate([a.numpy() for _, a in got])
    for i, s in enumerate(seqs):
        rows = slice(s * CTX, (s + 1) * CTX)
        np.testing.assert_array_equal(toks[i], tokens[rows])
        want = source.as_tensor(np.ascontiguousarray(stored[rows])).float().numpy()
        np.testing.assert_array_equal(values[i], want)

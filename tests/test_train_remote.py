"""Training and evaluation from a cache in an object store (a real S3 server, tests/s3_server.py):
the same bits as from a local copy, whole chunks or ranged reads; damaged objects and bad
credentials are clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

import train.object_store as object_store
from evaluate.config import EvalConfig
from evaluate.run_eval import run_evaluation
from evaluate.heldout import read_sequences
from tests.cache_factory import sparse_feature_activations, write_cache
from tests.s3_server import BUCKET, s3_fixture
from tests.test_train_loop import make_cfg
from train.cache_reader import CacheError, complete_heldout_sequences, open_activations
from train.cli import run_training
from train.loader import ChunkLoader

s3 = s3_fixture()
pytestmark = pytest.mark.filterwarnings("ignore:.*records no model")    # synthetic caches: no delta LM loss


@pytest.fixture(autouse=True)
def writer_credentials(s3, monkeypatch):
    for k, v in s3.env("writer").items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module", params=[None, "zstd"])
def caches(s3, tmp_path_factory, request):
    """(local folder, the same cache uploaded to the store): 24 chunks, one incomplete."""
    x, _, _ = sparse_feature_activations(16 * 48, 8, 12, 2, seed=1)
    local = write_cache(tmp_path_factory.mktemp("c") / "cache", {(3, "mlp_out"): x}, context_length=16,
                        chunk_rows=32, incomplete=[4], codec=request.param)
    return local, s3.upload(local, f"train_{request.param or 'bare'}")


def ranged(monkeypatch):
    """Several ranged GETs per chunk, rows nobody asked for left out."""
    monkeypatch.setattr(object_store, "RANGE_BYTES", 4 * 16)     # 4 rows of 8 bf16 values per GET
    monkeypatch.setattr(object_store, "GAP_BYTES", 16)


@pytest.fixture(scope="module")
def local_run(caches, tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    run_training(make_cfg(caches[0], run), single=True)
    return run


@pytest.mark.parametrize("fetch", ["whole", "ranged"])
def test_training_from_the_store_equals_training_from_a_local_copy(caches, local_run, fetch, tmp_path, monkeypatch):
    local, url = caches
    if fetch == "ranged":
        if not open_activations(local, 3, "mlp_out").raw_layout:
            pytest.skip("compressed chunks are fetched whole and decoded by zarr")
        ranged(monkeypatch)
    run_training(make_cfg(url, tmp_path / "remote"), single=True)
    assert (tmp_path / "remote" / "sae.safetensors").read_bytes() == (local_run / "sae.safetensors").read_bytes()
    meta = json.loads((tmp_path / "remote" / "sae.json").read_text())
    assert meta["cache"] == url and meta["training"]["complete_chunks_used"] == 23
    if fetch == "whole":     # `make eval` of the remote run reads the held-out rows from the store: the same report
        for run in (local_run, tmp_path / "remote"):
            run_evaluation(EvalConfig(run=str(run), device="cpu", progress=False))
        first, second = (json.loads((r / "eval" / "report.json").read_text()) for r in (local_run, tmp_path / "remote"))
        assert first["reconstruction"] == second["reconstruction"] and first["reconstruction"]["n_tokens"] > 0


@pytest.mark.parametrize("fetch", ["whole", "ranged"])
def test_loader_windows_and_heldout_reads_equal_local_ones(caches, fetch, monkeypatch):
    local, url = caches
    if fetch == "ranged":
        ranged(monkeypatch)
    a, b = open_activations(local, 3, "mlp_out"), open_activations(url, 3, "mlp_out")
    assert b.remote is not None and not b.raw_layout
    chunks = np.flatnonzero(a.complete)
    held = complete_heldout_sequences(a, {"fraction": 0.1, "seed": 0})
    la, lb = (ChunkLoader(s, chunks, held, 32, 96, seed=3, num_readers=2) for s in (a, b))
    for _ in range(30):
        assert np.array_equal(la.next_batch().float().numpy(), lb.next_batch().float().numpy())
    la.close(), lb.close()
    ta, xa = read_sequences(a, held)
    tb, xb = read_sequences(b, held)
    assert np.array_equal(ta, tb) and np.array_equal(xa.float().numpy(), xb.float().numpy())


def test_a_damaged_remote_chunk_is_refused(s3, tmp_path):
    x, _, _ = sparse_feature_activations(16 * 8, 8, 12, 2, seed=2)
    local = write_cache(tmp_path / "c", {(3, "mlp_out"): x}, context_length=16, chunk_rows=32)
    url = s3.upload(local, "damaged")
    client = s3.client()
    client.delete_object(Bucket=BUCKET, Key="damaged/layer_3/mlp_out/c/1/0")
    body = (local / "layer_3/mlp_out/c/2/0").read_bytes()
    client.put_object(Bucket=BUCKET, Key="damaged/layer_3/mlp_out/c/2/0", Body=body[:100])
    src = open_activations(url, 3, "mlp_out")
    out = np.zeros((32, 8), dtype=np.uint16)
    with pytest.raises(CacheError, match=r"chunk 1 of layer_3/mlp_out is marked complete .* is missing.*--repair"):
        src.read_chunk_into(1, out)
    with pytest.raises(CacheError, match=r"chunk 2 .* is 100 bytes, expected 512"):
        src.read_chunk_into(2, out)


@pytest.mark.parametrize("user, url, message", [
    ("nobody", f"s3://{BUCKET}/train_bare", "rejected the credentials"),
    ("writer", "s3://no-such-bucket/cache", "bucket does not exist"),
    ("writer", f"s3://{BUCKET}/no/cache/here", "no cache at 's3://jumpscope-tests/no/cache/here'"),
])
def test_bad_store_input_is_a_clear_error(s3, monkeypatch, user, url, message):
    for k, v in s3.env(user).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CacheError, match=message):
        open_activations(url, 3, "mlp_out")


def test_fetch_plan_covers_wanted_rows_only():
    slots = np.full(100, -1)
    slots[[3, 4, 5, 9, 60, 61]] = np.arange(6)
    plan = object_store.fetch_plan(slots, row_bytes=1 << 18)      # gap 4 rows joins, 8-row parts
    assert plan == [(3, 10), (60, 62)]
    whole = object_store.fetch_plan(np.arange(100), row_bytes=1 << 20)     # 8 MiB parts of 1 MiB rows
    assert len(whole) == 13 and whole[0][0] == 0 and whole[-1][1] == 100
    assert all(b == c for (_, b), (c, _) in zip(whole, whole[1:])) and max(b - a for a, b in whole) <= 8
    assert object_store.fetch_plan(np.full(10, -1), row_bytes=16) == []

"""ChunkLoader: coverage per epoch, BOS and held-out rows never served, seeds, resume."""
import numpy as np
import pytest
import torch

from tests.cache_factory import stored_as_float, write_cache
from train.cache_reader import heldout_sequences, open_activations
from train.loader import ChunkLoader

CTX, ROWS, N_CHUNKS = 8, 32, 24


@pytest.fixture(scope="module")
def indexed_cache(tmp_path_factory):
    """Column 0 of each row holds its row index (float32 storage: exact); chunks 5 and 11 incomplete."""
    n = ROWS * N_CHUNKS
    acts = np.zeros((n, 3), dtype=np.float32)
    acts[:, 0] = np.arange(n)
    acts[:, 1] = np.random.default_rng(0).standard_normal(n)
    path = write_cache(tmp_path_factory.mktemp("c") / "cache", {(1, "resid_post"): acts}, context_length=CTX,
                       chunk_rows=ROWS, storage_dtype="float32", incomplete=[5, 11])
    return open_activations(path, 1, "resid_post")


def make_loader(source, seed=0, batch=20, buffer=3 * ROWS, heldout_fraction=0.1):
    held = heldout_sequences(source.n_sequences, heldout_fraction, 7)
    chunks = np.flatnonzero(source.complete)
    return ChunkLoader(source, chunks, held, batch, buffer, seed, num_readers=2), held


def served_rows(loader, n_rows):
    rows = []
    while len(rows) < n_rows:
        rows.extend(loader.next_batch()[:, 0].long().tolist())
    return np.array(rows)


def expected_rows(source, held):
    r = np.arange(source.n_tokens)
    ok = (r % CTX != 0) & source.complete[r // ROWS] & ~np.isin(r // CTX, held)
    return r[ok]


@pytest.mark.parametrize("batch,buffer", [(20, 3 * ROWS), (100, ROWS), (7, 1000 * ROWS)])
def test_every_training_row_once_per_epoch(indexed_cache, batch, buffer):
    """Also with batches spanning several windows (batch > window) and a buffer larger than the cache."""
    loader, held = make_loader(indexed_cache, batch=batch, buffer=buffer)
    want = expected_rows(indexed_cache, held)
    assert loader.rows_per_epoch == len(want) and len(held) > 0
    rows = served_rows(loader, 3 * len(want))
    loader.close()
    epochs = [rows[i * len(want):(i + 1) * len(want)] for i in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), want)       # each servable row exactly once
    assert not np.array_equal(epochs[0], epochs[1])            # a new order each epoch
    assert not np.isin(rows // CTX, held).any()                # held-out sequences never served
    assert not (rows % CTX == 0).any()                         # BOS never served
    assert not np.isin(rows // ROWS, [5, 11]).any()            # incomplete chunks never served


def test_batches_are_shuffled_across_chunks(indexed_cache):
    loader, _ = make_loader(indexed_cache, batch=40)
    batch = loader.next_batch()[:, 0].long().numpy()
    loader.close()
    assert len(np.unique(batch // ROWS)) >= 3                  # drawn from the whole buffer, not one chunk
    assert len(np.unique(batch // CTX)) >= 8                   # and from many of their sequences


def test_seed_determinism(indexed_cache):
    a, _ = make_loader(indexed_cache, seed=1)
    b, _ = make_loader(indexed_cache, seed=1)
    c, _ = make_loader(indexed_cache, seed=2)
    ra, rb, rc = served_rows(a, 400), served_rows(b, 400), served_rows(c, 400)
    for loader in (a, b, c):
        loader.close()
    np.testing.assert_array_equal(ra, rb)
    assert not np.array_equal(ra, rc)


@pytest.mark.parametrize("stop_after", [1, 7, 23])
def test_resume_from_state_equals_uninterrupted(indexed_cache, stop_after):
    full, _ = make_loader(indexed_cache, seed=3)
    reference = [full.next_batch().clone() for _ in range(stop_after + 15)]
    full.close()
    first, _ = make_loader(indexed_cache, seed=3)
    for _ in range(stop_after):
        first.next_batch()
    state = first.state_dict()
    first.close()
    resumed, _ = make_loader(indexed_cache, seed=3)
    resumed.load_state_dict(state)
    rest = [resumed.next_batch().clone() for _ in range(15)]
    resumed.close()
    for got, want in zip(rest, reference[stop_after:]):
        assert torch.equal(got, want)


def test_bf16_bits_read_back_losslessly(tmp_path):
    acts = np.random.default_rng(1).standard_normal((64, 5)).astype(np.float32) * 3
    path = write_cache(tmp_path / "c", {(0, "mlp_out"): acts}, context_length=8, chunk_rows=16)
    src = open_activations(path, 0, "mlp_out")
    chunk = src.read_chunk(2)
    assert chunk.dtype == torch.bfloat16
    np.testing.assert_array_equal(chunk.float().numpy(), stored_as_float(acts, "bfloat16")[32:48])
    loader = ChunkLoader(src, np.flatnonzero(src.complete), [], 16, 64, 0, num_readers=1)
    batch = loader.next_batch().clone()
    loader.close()
    assert batch.dtype == torch.bfloat16
    stored = stored_as_float(acts, "bfloat16")
    for row in batch.float().numpy():                           # every served row is a stored row, bit for bit
        assert (stored == row).all(1).any()


def test_cuda_path_logic_with_stubbed_cuda(indexed_cache, monkeypatch):
    """The CUDA path (windows uploaded once, batches gathered on the device) serves the same rows per
    batch as the CPU path. No GPU here: streams, events and pinning are stubbed, the 'device' is the CPU.
    This checks the bookkeeping, not the CUDA semantics."""
    stub_cuda(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    for batch, buffer in ((20, 3 * ROWS), (100, ROWS)):
        cuda, held = make_loader(indexed_cache, batch=batch, buffer=buffer)
        cuda.device = FakeCuda()
        cpu, _ = make_loader(indexed_cache, batch=batch, buffer=buffer)
        n = 2 * cuda.rows_per_epoch // batch
        for _ in range(n):
            a = cuda.next_batch()[:, 0].long().numpy()
            b = cpu.next_batch()[:, 0].long().numpy()
            assert sorted(a) == sorted(b)
        assert cuda.position == cpu.position
        cuda.close()
        cpu.close()


def test_raw_and_compressed_chunks_serve_the_same_batches(tmp_path):
    """Chunks without a codec are read straight into the window buffer, compressed ones through
    zarr: same seed, same batches, whichever path."""
    n = ROWS * N_CHUNKS
    acts = np.random.default_rng(1).standard_normal((n, 5)).astype(np.float32)
    acts[:, 0] = np.arange(n)
    batches = {}
    for codec in (None, "zstd"):
        path = write_cache(tmp_path / str(codec), {(0, "mlp_out"): acts}, context_length=CTX, chunk_rows=ROWS,
                           storage_dtype="bfloat16", codec=codec)
        source = open_activations(path, 0, "mlp_out")
        assert (source.raw_chunk_path(0) is None) == (codec is not None)
        loader, _ = make_loader(source, batch=37, buffer=4 * ROWS)
        batches[codec] = torch.stack([loader.next_batch().clone() for _ in range(40)])
        loader.close()
    assert torch.equal(batches[None], batches["zstd"])


@pytest.mark.parametrize("batch,buffer", [(20, 3 * ROWS), (100, ROWS), (64, 4 * ROWS)])
def test_batches_are_consecutive_cuts_of_the_window_permutations(indexed_cache, batch, buffer):
    """Each batch holds exactly the rows that the stream of window permutations (epoch after epoch)
    puts at its positions; only the order inside a batch is free (the readers keep file order)."""
    loader, _ = make_loader(indexed_cache, seed=5, batch=batch, buffer=buffer)
    stream = []
    for epoch in range(3):
        for w in range(loader.windows_per_epoch):
            ids = loader.window_chunks(epoch, w)
            perm = loader.window_permutation(epoch, w, ids)
            stream.extend(ids[perm // ROWS] * ROWS + perm % ROWS)   # window row -> cache row
    n_batches = 2 * loader.rows_per_epoch // batch
    for n in range(n_batches):
        got = loader.next_batch()[:, 0].long().numpy()
        np.testing.assert_array_equal(np.sort(got), np.sort(stream[n * batch:(n + 1) * batch]))
    loader.close()


def test_windows_of_more_than_32767_batches(tmp_path):
    """Batch indices inside one window beyond the int16 range: with batch 1, serving order must be
    the window's permutation itself."""
    n = 1024 * 40
    acts = np.arange(n, dtype=np.float32)[:, None]
    path = write_cache(tmp_path / "big", {(0, "mlp_out"): acts}, context_length=64, chunk_rows=1024,
                       storage_dtype="float32")
    source = open_activations(path, 0, "mlp_out")
    loader = ChunkLoader(source, np.arange(40), [], 1, n, seed=6, num_readers=1)
    ids = loader.window_chunks(0, 0)
    perm = loader.window_permutation(0, 0, ids)
    assert len(perm) > 2**15
    slots = loader.window_slots(0, 0, ids)
    served = np.flatnonzero(slots >= 0)[np.argsort(slots[slots >= 0])]     # window row of buffer row k
    np.testing.assert_array_equal(served, perm)
    loader.close()


# -- the exact stream of batches, against the definitions written out here ---------------------------
def expected_batches(source, held, seed, batch, buffer, n_batches):
    """Batches as the loader has always served them, from the definitions alone: complete chunks with
    rows to serve, in the order default_rng([seed, epoch]).permutation gives; windows of
    buffer // ROWS of them; each window's servable rows (window row j * ROWS + local of its j-th chunk:
    not BOS, not held out) in the order default_rng([seed, epoch, window, 1]).permutation gives; that
    stream cut into batches, and inside a batch each window's rows in window-row (file) order."""
    held = set(int(s) for s in held)
    chunks = [c for c in np.flatnonzero(source.complete)
              if any(s not in held for s in range(c * ROWS // CTX, (c + 1) * ROWS // CTX))]
    per_window = max(1, min(len(chunks), buffer // ROWS))
    batches, current, epoch = [], [], 0
    while len(batches) < n_batches:
        order = np.random.default_rng([seed, epoch]).permutation(chunks)
        for w in range(0, -(-len(order) // per_window)):
            ids = order[w * per_window:(w + 1) * per_window]
            servable = [j * ROWS + local for j, c in enumerate(ids) for local in range(ROWS)
                        if local % CTX != 0 and (c * ROWS + local) // CTX not in held]
            stream = np.random.default_rng([seed, epoch, w, 1]).permutation(np.array(servable))
            while len(stream):
                take, stream = stream[:batch - sum(len(p) for p in current)], stream[batch - sum(len(p) for p in current):]
                current.append(np.array([ids[r // ROWS] * ROWS + r % ROWS for r in np.sort(take)]))
                if sum(len(p) for p in current) == batch:
                    batches.append(np.concatenate(current))
                    current = []
        epoch += 1
    return batches[:n_batches]


@pytest.mark.parametrize("batch,buffer", [(20, 3 * ROWS), (100, ROWS), (64, 4 * ROWS), (7, 1000 * ROWS)])
def test_batches_are_exactly_the_defined_stream_order_included(indexed_cache, batch, buffer):
    loader, held = make_loader(indexed_cache, seed=11, batch=batch, buffer=buffer)
    n = 2 * loader.rows_per_epoch // batch + 3                     # past two epoch boundaries
    want = expected_batches(indexed_cache, held, 11, batch, buffer, n)
    for i in range(n):
        np.testing.assert_array_equal(loader.next_batch()[:, 0].long().numpy(), want[i], err_msg=f"batch {i}")
    loader.close()


def stub_cuda(monkeypatch):
    """CUDA streams, events, pinning and device allocation stubbed: the 'device' is the CPU. Returns
    the list of device copies made (to count those alive)."""
    import contextlib
    import weakref

    class Event:
        def record(self, stream=None): pass
        def synchronize(self): pass

    class Stream:
        def __init__(self, device=None): pass
        def wait_stream(self, other): pass
        def wait_event(self, event): pass

    real_empty, device_copies = torch.empty, []

    def empty(*a, device=None, **k):
        t = real_empty(*a, **k)
        if device is not None:
            device_copies.append(weakref.ref(t))
        return t
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    monkeypatch.setattr(torch, "empty", empty)
    return device_copies


class FakeCuda:
    type = "cuda"


@pytest.mark.parametrize("batch,buffer", [(20, 3 * ROWS), (100, ROWS), (7, 1000 * ROWS)])
def test_cuda_path_serves_the_defined_stream_reading_two_windows_ahead(indexed_cache, monkeypatch, batch, buffer):
    """With CUDA stubbed: the same exact batches; host buffers go back to the pool at upload, so two
    windows are read ahead of the one served, with at most three host buffers and two device copies."""
    device_copies = stub_cuda(monkeypatch)
    loader, held = make_loader(indexed_cache, seed=12, batch=batch, buffer=buffer)
    loader.device = FakeCuda()
    n = 2 * loader.rows_per_epoch // batch + 3
    want = expected_batches(indexed_cache, held, 12, batch, buffer, n)
    ahead = []
    for i in range(n):
        np.testing.assert_array_equal(loader.next_batch()[:, 0].long().numpy(), want[i], err_msg=f"batch {i}")
        current = loader._ordinal(loader.position[:2])
        ahead.append(max(loader._ordinal(k) for k in loader._windows) - current)
        on_device = [w for w in loader._windows.values() if w.device_tensor is not None]
        assert len(on_device) <= 2
        assert sum(r() is not None for r in device_copies) <= 3          # two windows, and a batch being cat'ed
    if batch < loader.rows_per_epoch // loader.windows_per_epoch:        # batches smaller than a window
        assert max(ahead) == 2 and loader._buffers.count <= 3
    loader.close()


def test_cpu_loader_holds_two_window_buffers(indexed_cache):
    """Host memory: the window served and the one read ahead, reused epoch after epoch."""
    loader, _ = make_loader(indexed_cache, batch=20, buffer=3 * ROWS)
    for _ in range(3 * loader.rows_per_epoch // 20):
        loader.next_batch()
        assert len(loader._windows) <= 2
    assert loader._buffers.count == 2
    loader.close()


def test_window_plans_are_made_off_the_serving_thread(indexed_cache, monkeypatch):
    """The permutation and slots of a window (the loader's costliest serial work) are computed on the
    planner thread ahead of time; only the very first window's is computed while the caller waits."""
    import threading
    threads = []
    real = ChunkLoader.window_slots

    def recording(self, *a):
        threads.append(threading.current_thread().name)
        return real(self, *a)
    monkeypatch.setattr(ChunkLoader, "window_slots", recording)
    loader, _ = make_loader(indexed_cache, batch=20, buffer=3 * ROWS)
    for _ in range(2 * loader.rows_per_epoch // 20):
        loader.next_batch()
    loader.close()
    assert threads[0] == threading.current_thread().name and len(threads) > 10
    assert all(name.startswith("window-planner") for name in threads[1:]), threads


def test_reader_threads_one_per_usable_core_by_default(monkeypatch):
    from train import loader as loader_module
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 6)
    assert loader_module.reader_threads(0) == 6 and loader_module.reader_threads(-1) == 6
    assert loader_module.reader_threads(2) == 2 and loader_module.reader_threads(64) == 6
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 64)
    assert loader_module.reader_threads(0) == loader_module.MAX_AUTO_READERS


def test_trainer_logs_the_fraction_of_time_spent_waiting_for_data(tmp_path, monkeypatch):
    """A disk that takes 200 ms a chunk: the step waits on the loader most of the time, and says so
    (at 50 ms a step slowed by other work on a loaded 2-core machine can take as long as a read)."""
    import json
    import time
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    import train.config  # noqa: F401
    from train.cache_reader import ActivationArray
    from train.cli import run_training
    acts = np.random.default_rng(3).standard_normal((ROWS * N_CHUNKS, 8)).astype(np.float32)
    path = write_cache(tmp_path / "c", {(0, "mlp_out"): acts}, context_length=CTX, chunk_rows=ROWS)
    conf = str(Path(__file__).resolve().parent.parent / "conf")

    def fractions(run):
        overrides = [f"cache={path}", "layer=0", "sublayer=mlp_out", f"run_dir={tmp_path / run}",
                     "train.progress=false", "train.tensorboard=false", "loader.batch_size=32",
                     "loader.buffer_tokens=64", "train.total_tokens=768", "train.log_every_steps=8",
                     "train.checkpoint_every_steps=0", "sae.width=16"]
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            run_training(compose("train", overrides=overrides), single=True)
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["data_wait_fraction"] for line in lines]

    fast = fractions("fast")
    real_read = ActivationArray.read_chunk_into

    def slow_read(self, *a, **k):
        time.sleep(0.2)
        return real_read(self, *a, **k)
    monkeypatch.setattr(ActivationArray, "read_chunk_into", slow_read)
    slow = fractions("slow")
    assert len(fast) == len(slow) == 3 and all(0 <= f <= 1 for f in fast + slow)
    assert min(slow) > 0.5 and np.median(slow) > np.median(fast)

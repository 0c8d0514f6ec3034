"""Shuffled chunk loader: whole chunks of one activation array, in a seeded random order (new each epoch),
read by several threads into a shuffle buffer, served as uniformly drawn batches of non-BOS, non-held-out
rows.

The buffer holds a window of `buffer_tokens // chunk_rows` chunks; the rows it may serve are drawn
from it by a random permutation (uniform sampling without replacement), while the next window is read
in the background. So every servable row is served exactly once per epoch, and the loader's position
is three integers (epoch, window, offset): a checkpoint stores those, and resuming re-reads one window.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .cache_reader import ActivationArray

class Window:
    """Chunks of one window, read into one buffer by the reader pool, and the permutation to serve."""

    def __init__(self, source: ActivationArray, chunk_ids: np.ndarray, servable: np.ndarray,
                 pool: ThreadPoolExecutor):
        rows = source.chunk_rows
        self.buffer = np.empty((len(chunk_ids) * rows, source.width), dtype=source.numpy_dtype)
        self.tensor = source.as_tensor(self.buffer)           # a view: no copy
        self.order = torch.from_numpy(servable)
        self.futures = [pool.submit(_read_into, source, int(c), self.buffer[j * rows:(j + 1) * rows])
                        for j, c in enumerate(chunk_ids)]

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []


def _read_into(source: ActivationArray, c: int, out: np.ndarray) -> None:
    source.read_chunk_into(c, out)


class ChunkLoader:
    """Batches of `batch_size` rows of `source` (stored dtype, on `device`), forever, epoch after epoch.

    chunks: the chunk indices it may read (complete ones); heldout: sorted held-out sequence indices.
    """

    def __init__(self, source: ActivationArray, chunks, heldout, batch_size: int, buffer_tokens: int,
                 seed: int, num_readers: int = 4, device="cpu", prefetch_batches: int = 2):
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.device = torch.device(device)
        rows, ctx = source.chunk_rows, source.context_length
        self.heldout = np.zeros(source.n_sequences, dtype=bool)
        self.heldout[np.asarray(heldout, dtype=np.int64)] = True
        per_chunk = self.heldout[:len(source.complete) * rows // ctx].reshape(-1, rows // ctx)
        servable_per_chunk = (~per_chunk).sum(1) * (ctx - 1)
        chunks = np.asarray(sorted(int(c) for c in chunks), dtype=np.int64)
        self.chunks = chunks[servable_per_chunk[chunks] > 0]   # skip chunks wholly held out
        if len(self.chunks) == 0:
            raise ValueError("no chunk with rows to serve (all incomplete or held out)")
        self.rows_per_epoch = int(servable_per_chunk[self.chunks].sum())
        self.chunks_per_window = max(1, min(len(self.chunks), int(buffer_tokens) // rows))
        self.windows_per_epoch = -(-len(self.chunks) // self.chunks_per_window)
        self.position = (0, 0, 0)       # (epoch, window, offset) of the next batch to hand out
        self._pool = ThreadPoolExecutor(max(1, int(num_readers)), thread_name_prefix="chunk-reader")
        self._prefetch_batches = max(1, int(prefetch_batches))
        self._thread = None

    # -- the deterministic plan --------------------------------------------------------------------
    def chunk_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.chunks)

    def window_chunks(self, epoch: int, window: int) -> np.ndarray:
        n = self.chunks_per_window
        return self.chunk_order(epoch)[window * n:(window + 1) * n]

    def servable_rows(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Buffer row indices of a window that may be served: not BOS (position 0), not held out."""
        rows, ctx = self.source.chunk_rows, self.source.context_length
        local = np.arange(rows)
        keep = []
        for j, c in enumerate(chunk_ids):
            ok = (local % ctx != 0) & ~self.heldout[(int(c) * rows + local) // ctx]
            keep.append(j * rows + local[ok])
        return np.concatenate(keep)

    def window_permutation(self, epoch: int, window: int, chunk_ids: np.ndarray) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, window, 1]).permutation(self.servable_rows(chunk_ids))

    def _advance(self, epoch, window):
        window += 1
        return (epoch + 1, 0) if window == self.windows_per_epoch else (epoch, window)

    def _plans(self, windows: dict):
        """Yield (parts, position after): parts = [(Window, row indices)] that make one batch."""
        epoch, w, off = self.position

        def window(e, i):
            if (e, i) not in windows:
                ids = self.window_chunks(e, i)
                windows[(e, i)] = Window(self.source, ids, self.window_permutation(e, i, ids), self._pool)
            return windows[(e, i)]

        current = window(epoch, w)
        window(*self._advance(epoch, w))                 # read ahead
        while True:
            parts, need = [], self.batch_size
            while need:
                take = min(need, len(current.order) - off)
                if take:
                    parts.append((current, current.order[off:off + take]))
                    off, need = off + take, need - take
                if off == len(current.order):
                    windows.pop((epoch, w), None)
                    epoch, w, off = *self._advance(epoch, w), 0
                    current = window(epoch, w)
                    window(*self._advance(epoch, w))
            yield parts, (epoch, w, off)

    # -- the batch producer thread -----------------------------------------------------------------
    def _start(self):
        self._stop = threading.Event()
        self._ready = queue.Queue()
        self._pinned = None
        if self.device.type == "cuda":
            # A ring of pinned host buffers; a slot is refilled only after its copy to the GPU is done.
            shape = (self.batch_size, self.source.width)
            self._pinned = [torch.empty(shape, dtype=self.source.torch_dtype).pin_memory()
                            for _ in range(self._prefetch_batches + 1)]
            self._free = queue.Queue()
            for i in range(len(self._pinned)):
                self._free.put((i, None))
        self._thread = threading.Thread(target=self._produce, name="batch-producer", daemon=True)
        self._thread.start()

    def _produce(self):
        windows = {}
        try:
            for parts, position in self._plans(windows):
                if self._pinned is not None:
                    slot, copied = self._free.get()
                    if slot is None:
                        return
                    if copied is not None:
                        copied.synchronize()
                    out = self._pinned[slot]
                else:
                    slot, out = None, torch.empty((self.batch_size, self.source.width), dtype=self.source.torch_dtype)
                start = 0
                for win, idx in parts:
                    win.wait()
                    torch.index_select(win.tensor, 0, idx, out=out[start:start + len(idx)])
                    start += len(idx)
                while not self._stop.is_set():
                    if self._ready.qsize() < self._prefetch_batches:
                        self._ready.put((slot, out, position))
                        break
                    self._stop.wait(0.0005)
                if self._stop.is_set():
                    return
        except BaseException as e:  # hand the error to the consumer
            self._ready.put((None, e, None))

    def next_batch(self) -> torch.Tensor:
        """The next batch [batch_size, width] in the stored dtype, on the loader's device."""
        if self._thread is None:
            self._start()
        slot, out, position = self._ready.get()
        if isinstance(out, BaseException):
            raise RuntimeError("the chunk loader failed") from out
        self.position = position
        if self._pinned is None:
            return out
        x = out.to(self.device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._free.put((slot, copied))
        return x

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        return self.position[0]

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": list(self.position), "seed": self.seed, "chunks": self.chunks.tolist(),
                "batch_size": self.batch_size, "chunks_per_window": self.chunks_per_window}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "chunks_per_window"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpointed loader has {key}={state[key]}, this one {getattr(self, key)}")
        if state["chunks"] != self.chunks.tolist():
            raise ValueError("the cache's complete chunks changed since the checkpoint; cannot resume the same order")
        self.close()
        self.position = tuple(int(v) for v in state["position"])

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            if self._pinned is not None:
                self._free.put((None, None))
            self._thread.join(timeout=10)
            self._thread = None

    def __del__(self):
        try:
            self.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass

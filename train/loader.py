"""Shuffled chunk loader: whole chunks of one activation array, in a seeded random order (new each epoch),
read by several threads into a shuffle buffer, served as uniformly drawn batches of non-BOS, non-held-out
rows.

The buffer holds a window of `buffer_tokens // chunk_rows` chunks; the rows it may serve are drawn
from it by a random permutation (uniform sampling without replacement), which the reader threads
apply as they read (each row is copied once, from the file to its place in serving order), while the
next window is read in the background. So every servable row is served exactly once per epoch, and
the loader's position is three integers (epoch, window, offset): a checkpoint stores those, and
resuming re-reads one window.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .cache_reader import ActivationArray

def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not Linux
        return os.cpu_count() or 1


class BufferPool:
    """Host buffers for windows, reused so that reads do not fault fresh pages in (pinned on CUDA)."""

    def __init__(self, shape, dtype, pinned: bool):
        self.shape, self.dtype, self.pinned = shape, dtype, pinned
        self.free = []           # (tensor, CUDA event after which it may be overwritten, or None)
        self.lock = threading.Lock()

    def acquire(self) -> torch.Tensor:
        with self.lock:
            item = self.free.pop() if self.free else None
        if item is None:        # pinned from the start: no pageable copy of a multi-GB window
            return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pinned)
        buf, done = item
        if done is not None:
            done.synchronize()
        return buf

    def release(self, buf: torch.Tensor, done=None) -> None:
        with self.lock:
            self.free.append((buf, done))


class Window:
    """Chunks of one window, read by the reader pool straight into serving order in one buffer.

    `slots` gives each row of the window's chunks its buffer row (-1: not served), so a batch is a
    contiguous slice (no gather pass over the bytes). On CUDA the whole window is copied to the
    device once (asynchronously, on a side stream) and batches are slices of that copy."""

    def __init__(self, source: ActivationArray, chunk_ids: np.ndarray, slots: np.ndarray,
                 pool: ThreadPoolExecutor, buffers: BufferPool):
        rows = source.chunk_rows
        self.buffers, self.full = buffers, buffers.acquire()
        self.size = int((slots >= 0).sum())
        self.tensor = self.full[:self.size].view(source.torch_dtype)     # views of one memory: no copies
        raw = self.full.numpy().view(source.numpy_dtype)
        self.futures = [pool.submit(source.read_chunk_into, int(c), raw, slots[j * rows:(j + 1) * rows])
                        for j, c in enumerate(chunk_ids)]
        self.device_tensor = self.uploaded = None

    def reads_done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []

    def upload(self, device: torch.device, stream) -> None:
        """Start the asynchronous copy of the window to `device`; once per window."""
        if self.uploaded is not None:
            return
        self.wait()
        main = torch.cuda.current_stream(device)
        stream.wait_stream(main)                # the device memory below is allocated on `main`
        self.device_tensor = torch.empty(self.tensor.shape, dtype=self.tensor.dtype, device=device)
        with torch.cuda.stream(stream):
            self.device_tensor.copy_(self.tensor, non_blocking=True)
            self.uploaded = torch.cuda.Event()
            self.uploaded.record(stream)
        self.device_tensor.record_stream(stream)

    def rows(self, lo: int, hi: int, device_type: str) -> torch.Tensor:
        """Served rows lo:hi, a view of the window (on the device once uploaded, on CUDA)."""
        return (self.device_tensor if device_type == "cuda" else self.tensor)[lo:hi]

    def release(self) -> None:
        """Hand the host buffer back for reuse (after the device copy, if any, is done)."""
        self.wait()
        self.buffers.release(self.full, self.uploaded)


class ChunkLoader:
    """Batches of `batch_size` rows of `source` (stored dtype, on `device`), forever, epoch after epoch.

    chunks: the chunk indices it may read (complete ones); heldout: sorted held-out sequence indices.
    """

    def __init__(self, source: ActivationArray, chunks, heldout, batch_size: int, buffer_tokens: int,
                 seed: int, num_readers: int = 4, device="cpu"):
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
        self.servable_per_chunk = servable_per_chunk            # by chunk index
        self.rows_per_epoch = int(servable_per_chunk[self.chunks].sum())
        self.chunks_per_window = max(1, min(len(self.chunks), int(buffer_tokens) // rows))
        self.windows_per_epoch = -(-len(self.chunks) // self.chunks_per_window)
        self.position = (0, 0, 0)       # (epoch, window, offset) of the next batch to hand out
        # Readers copy memory: more of them than cores only contend (2 readers beat 4 on 2 cores)
        self.num_readers = max(1, min(int(num_readers), _usable_cores()))
        self._pool = ThreadPoolExecutor(self.num_readers, thread_name_prefix="chunk-reader")
        host_dtype = torch.int16 if source.storage_dtype == "bfloat16" else torch.float32
        self._buffers = BufferPool((self.chunks_per_window * rows, source.width), host_dtype,
                                   pinned=self.device.type == "cuda")
        self._plan = None           # the generator of batch plans, once serving has started

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
        return self._permute(epoch, window, self.servable_rows(chunk_ids))

    def _permute(self, epoch: int, window: int, servable: np.ndarray) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, window, 1]).permutation(servable)

    def window_phase(self, epoch: int, window: int) -> int:
        """Rows served before the window, modulo batch_size: where the stream of batches cuts it."""
        before = self.chunk_order(epoch)[:window * self.chunks_per_window]
        return (epoch * self.rows_per_epoch + int(self.servable_per_chunk[before].sum())) % self.batch_size

    def window_slots(self, epoch: int, window: int, chunk_ids: np.ndarray) -> np.ndarray:
        """The buffer row of each row of the window's chunks (-1: not served).

        The window's permutation, cut where the stream of batches cuts it, decides which rows make
        each batch (a uniformly drawn set). Inside a batch, rows keep their order in the files: a
        reader then writes a chunk into a few sequential runs instead of rows scattered over the
        whole window, which is measurably faster. Do not sub-slice a batch expecting a random subset."""
        rows = self.servable_rows(chunk_ids)          # ascending
        order = self._permute(epoch, window, rows)
        served_at = np.empty(len(chunk_ids) * self.source.chunk_rows, dtype=np.int64)
        served_at[order] = np.arange(len(order))
        phase = self.window_phase(epoch, window)
        batch = (phase + served_at[rows]) // self.batch_size
        if (phase + len(order) - 1) // self.batch_size < 2**15:      # the largest batch index
            batch = batch.astype(np.int16)      # numpy's stable sort of int16 is a radix sort: 4x faster
        slots = np.full(len(served_at), -1, dtype=np.int64)
        slots[rows[np.argsort(batch, kind="stable")]] = np.arange(len(order))
        return slots

    def _advance(self, epoch, window):
        window += 1
        return (epoch + 1, 0) if window == self.windows_per_epoch else (epoch, window)

    def _plans(self):
        """Yield (parts, position after): parts = [(epoch, window, lo, hi)]: served rows lo:hi of each
        window make one batch."""
        epoch, w, off = self.position
        while True:
            parts, need = [], self.batch_size
            while need:
                take = min(need, self._window(epoch, w).size - off)
                parts.append((epoch, w, off, off + take))
                off, need = off + take, need - take
                if off == self._window(epoch, w).size:
                    epoch, w, off = *self._advance(epoch, w), 0
            yield parts, (epoch, w, off)

    def _window(self, epoch: int, window: int) -> Window:
        """The window, its chunks' reads started when it is first asked for."""
        if (epoch, window) not in self._windows:
            ids = self.window_chunks(epoch, window)
            self._windows[(epoch, window)] = Window(self.source, ids, self.window_slots(epoch, window, ids),
                                                    self._pool, self._buffers)
        return self._windows[(epoch, window)]

    def _release(self, key) -> None:
        """Window `key` is served: its buffer takes the read-ahead (two window buffers in all)."""
        self._windows.pop(key).release()
        epoch, w, _ = self.position
        self._window(*self._advance(epoch, w))

    # -- serving batches -------------------------------------------------------------------------
    # The reader threads put each window's rows in serving order, so a batch inside one window is a
    # slice of it. A batch that spans two windows (once per window) is copied together, and the
    # older window is released as soon as its rows are copied, so the read-ahead never waits on the
    # newer one. On CUDA each window is copied to the device once (pinned buffer, side stream,
    # asynchronous) and sliced there: the host only reads files.
    def next_batch(self) -> torch.Tensor:
        """The next batch [batch_size, width] in the stored dtype, on the loader's device.

        The tensor may be a view of the loader's window: it stays valid until the next call (clone it
        to keep it longer)."""
        cuda = self.device.type == "cuda"
        if self._plan is None:
            self._windows, self._served = {}, None
            self._stream = torch.cuda.Stream(self.device) if cuda else None
            self._spare = None if cuda else torch.empty((self.batch_size, self.source.width),
                                                        dtype=self.source.torch_dtype)
            self._plan = self._plans()
            self._window(*self.position[:2])
            self._window(*self._advance(*self.position[:2]))      # read ahead
        if self._served is not None:          # the last batch was a view of a finished window
            self._release(self._served)
            self._served = None
        parts, position = next(self._plan)
        self.position = position
        pieces, start = [], 0
        for epoch, w, lo, hi in parts:
            win = self._windows[(epoch, w)]
            if cuda:
                win.upload(self.device, self._stream)
                torch.cuda.current_stream(self.device).wait_event(win.uploaded)
            else:
                win.wait()
            rows = win.rows(lo, hi, self.device.type)
            if len(parts) == 1 or cuda:
                pieces.append(rows)
            else:
                pieces.append(self._spare[start:start + hi - lo].copy_(rows))
                start += hi - lo
            if hi == win.size:
                if len(parts) == 1:
                    self._served = (epoch, w)
                else:
                    self._release((epoch, w))
        batch = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if cuda else self._spare
        if cuda:
            for win in list(self._windows.values()):     # start copying read-ahead windows as soon as read
                if win.uploaded is None and win.reads_done():
                    win.upload(self.device, self._stream)
        return batch

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
        if self._plan is not None:
            self._plan.close()
            self._plan = None
        if getattr(self, "_windows", None):
            for win in self._windows.values():
                win.wait()
            self._windows = {}

    def __del__(self):
        try:
            self.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass

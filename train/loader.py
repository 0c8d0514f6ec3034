"""Shuffled chunk loader: whole chunks of one activation array, in a seeded random order (new each epoch),
read by several threads into a shuffle buffer, served as uniformly drawn batches of non-BOS, non-held-out
rows.

The buffer holds a window of `buffer_tokens // chunk_rows` chunks; the rows it may serve are drawn
from it by a random permutation (uniform sampling without replacement), which the reader threads
apply as they read (each row is copied once, from the file to its place in serving order), while the
next window is read in the background. So every servable row is served exactly once per epoch, and
the loader's position is three integers (epoch, window, offset): a checkpoint stores those, and
resuming re-reads one window.

Threads: the caller's (serving: hands out slices, never computes or copies in bulk, except the one
batch per window that spans two windows), one planner (the next windows' permutations and slots,
ahead of time) and `num_readers` readers (file -> buffer, outside the GIL).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .cache_reader import ActivationArray
from .scatter_read import plan_scatter

MAX_AUTO_READERS = 16


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not Linux
        return os.cpu_count() or 1


def reader_threads(requested: int) -> int:
    """Reader threads for `num_readers=requested`: 0 or less means one per usable core (at most
    MAX_AUTO_READERS); more than the cores only contend, so never more than those."""
    cores = usable_cores()
    wanted = min(cores, MAX_AUTO_READERS) if int(requested) <= 0 else int(requested)
    return max(1, min(wanted, cores))


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def advise_huge_pages(buf: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under a fresh (untouched) buffer: rows scattered over a
    multi-GB window then miss the TLB far less (reads into the window measured 5-10% faster where
    THP is `madvise`). Nothing happens elsewhere."""
    start = -(-buf.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (buf.data_ptr() + buf.numel() * buf.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start or _madvise is None:
        return
    _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise() if sys.platform.startswith("linux") else None


class BufferPool:
    """Host buffers for windows, reused so that reads do not fault fresh pages in (pinned on CUDA).

    A buffer handed back with a CUDA event (its upload) is reused once the event has passed."""

    def __init__(self, shape, dtype, pinned: bool, limit: int):
        self.shape, self.dtype, self.pinned, self.limit = shape, dtype, pinned, int(limit)
        self.free = []           # (tensor, CUDA event after which it may be overwritten, or None), oldest first
        self.count = 0           # buffers allocated
        self.lock = threading.Lock()

    def _take(self, allocate: bool):
        with self.lock:
            if self.free:
                buf, done = self.free.pop(0)
            elif allocate or self.count < self.limit:
                self.count += 1
                buf, done = None, None
            else:
                return None
        if buf is None:          # pinned from the start: no pageable copy of a multi-GB window
            buf = torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pinned)
            if not self.pinned:
                advise_huge_pages(buf)
            return buf
        if done is not None:     # the oldest upload: long finished by the time a read-ahead asks
            done.synchronize()
        return buf

    def acquire(self) -> torch.Tensor:
        """A buffer, allocated beyond the limit if none is free (a batch spanning many windows)."""
        return self._take(allocate=True)

    def try_acquire(self) -> torch.Tensor | None:
        """A buffer for reading ahead, or None when `limit` of them are in use."""
        return self._take(allocate=False)

    def release(self, buf: torch.Tensor, done=None) -> None:
        with self.lock:
            self.free.append((buf, done))


class WindowPlan:
    """What the planner thread works out for a window before its reads: its chunks, the buffer row of
    each of their rows (`slots`), the rows it serves, and for bare chunk files the reads themselves."""

    def __init__(self, chunk_ids: np.ndarray, slots: np.ndarray, size: int, scatter: list | None):
        self.chunk_ids, self.slots, self.size, self.scatter = chunk_ids, slots, int(size), scatter


class Window:
    """Chunks of one window, read by the reader pool straight into serving order in one buffer.

    `slots` gives each row of the window's chunks its buffer row (-1: not served), so a batch is a
    contiguous slice (no gather pass over the bytes). On CUDA the whole window is copied to the
    device once (asynchronously, on a side stream), its host buffer is handed back as soon as that
    copy is done, and batches are slices of the device copy."""

    def __init__(self, source: ActivationArray, plan: WindowPlan, pool: ThreadPoolExecutor, buffers: BufferPool,
                 buffer: torch.Tensor):
        rows = source.chunk_rows
        self.buffers, self.full, self.size = buffers, buffer, plan.size
        self.tensor = self.full[:self.size].view(source.torch_dtype)     # views of one memory: no copies
        self.raw = self.full.numpy().view(source.numpy_dtype)
        self.futures = [pool.submit(source.read_chunk_into, int(c), self.raw, plan.slots[j * rows:(j + 1) * rows],
                                    plan.scatter[j] if plan.scatter else None)
                        for j, c in enumerate(plan.chunk_ids)]
        self.device_tensor = self.uploaded = None

    def reads_done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []

    def upload(self, device: torch.device, stream) -> None:
        """Start the asynchronous copy of the window to `device`; once per window. The host buffer
        goes back to the pool with the copy's event, so the next read can start before this window
        is served."""
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
        self.buffers.release(self.full, self.uploaded)
        self.full = self.tensor = self.raw = None

    def rows(self, lo: int, hi: int, device_type: str) -> torch.Tensor:
        """Served rows lo:hi, a view of the window (on the device once uploaded, on CUDA)."""
        return (self.device_tensor if device_type == "cuda" else self.tensor)[lo:hi]

    def release(self) -> None:
        """Hand the host buffer back for reuse (unless the upload already did) and drop the device copy."""
        self.wait()
        if self.full is not None:
            self.buffers.release(self.full, None)
            self.full = self.tensor = self.raw = None
        self.device_tensor = None


class ChunkLoader:
    """Batches of `batch_size` rows of `source` (stored dtype, on `device`), forever, epoch after epoch.

    chunks: the chunk indices it may read (complete ones); heldout: sorted held-out sequence indices.
    num_readers: reader threads (0: one per usable core).
    """

    def __init__(self, source: ActivationArray, chunks, heldout, batch_size: int, buffer_tokens: int,
                 seed: int, num_readers: int = 0, device="cpu"):
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
        self.num_readers = reader_threads(num_readers)
        self._pool = ThreadPoolExecutor(self.num_readers, thread_name_prefix="chunk-reader")
        self._planner = ThreadPoolExecutor(1, thread_name_prefix="window-planner")
        self._plan = None           # the generator of batch plans, once serving has started
        host_dtype = torch.int16 if source.storage_dtype == "bfloat16" else torch.float32
        self._buffers = BufferPool((self.chunks_per_window * rows, source.width), host_dtype,
                                   pinned=self.device.type == "cuda", limit=2)

    # -- the deterministic plan --------------------------------------------------------------------
    def chunk_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.chunks)

    def window_chunks(self, epoch: int, window: int) -> np.ndarray:
        n = self.chunks_per_window
        return self.chunk_order(epoch)[window * n:(window + 1) * n]

    def servable_rows(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Buffer row indices of a window that may be served (ascending): not BOS (position 0), not held out."""
        rows, ctx = self.source.chunk_rows, self.source.context_length
        per_chunk = rows // ctx
        sequences = np.asarray(chunk_ids, dtype=np.int64)[:, None] * per_chunk + np.arange(per_chunk)
        keep = ~self.heldout[sequences][:, :, None] & (np.arange(ctx) != 0)      # [chunk, sequence, position]
        return np.flatnonzero(keep.ravel())

    def _shuffle_order(self, epoch: int, window: int, n: int) -> np.ndarray:
        """rng.permutation(servable) == servable[rng.permutation(len(servable))]: Generator.shuffle
        makes the same swaps whatever the values, so the positions are shuffled (int32, less memory)."""
        order = np.arange(n, dtype=np.int32)
        np.random.default_rng([self.seed, epoch, window, 1]).shuffle(order)
        return order

    def window_permutation(self, epoch: int, window: int, chunk_ids: np.ndarray) -> np.ndarray:
        """The window's rows in serving order: a uniform permutation of its servable rows."""
        servable = self.servable_rows(chunk_ids)
        return servable[self._shuffle_order(epoch, window, len(servable))]

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
        servable = self.servable_rows(chunk_ids)          # ascending
        n = len(servable)
        order = self._shuffle_order(epoch, window, n)    # serving position k holds servable[order[k]]
        phase = self.window_phase(epoch, window)
        batch_dtype = np.int16 if (phase + n - 1) // self.batch_size < 2**15 else np.int64
        batch = np.empty(n, dtype=batch_dtype)           # the batch of each servable row
        batch[order] = (phase + np.arange(n)) // self.batch_size
        # stable: file order inside a batch; numpy's stable sort of int16 is a radix sort (4x faster)
        by_batch = np.argsort(batch, kind="stable")
        window_rows = len(chunk_ids) * self.source.chunk_rows
        index = np.int32 if window_rows < 2**31 else np.int64
        slot_of_servable = np.empty(n, dtype=index)       # two passes, each over a small array: 3x faster
        slot_of_servable[by_batch] = np.arange(n, dtype=index)
        slots = np.full(window_rows, -1, dtype=index)
        slots[servable] = slot_of_servable
        return slots

    def _window_plan(self, key) -> WindowPlan:
        ids = self.window_chunks(*key)
        slots = self.window_slots(*key, ids)
        scatter = None
        if self.source.raw_layout:
            row_bytes = self.source.width * np.dtype(self.source.numpy_dtype).itemsize
            scatter = plan_scatter(slots.reshape(len(ids), self.source.chunk_rows), row_bytes)
        return WindowPlan(ids, slots, int(self.servable_per_chunk[ids].sum()), scatter)

    def _ordinal(self, key) -> int:
        return key[0] * self.windows_per_epoch + key[1]

    def _key(self, ordinal: int) -> tuple[int, int]:
        return divmod(ordinal, self.windows_per_epoch)

    def _advance(self, epoch, window):
        return self._key(self._ordinal((epoch, window)) + 1)

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

    def _planned(self, key) -> Future:
        """The plan of window `key`, computed on the planner thread (started now if it was not)."""
        if key not in self._plan_futures:
            self._plan_futures[key] = self._planner.submit(self._window_plan, key)
        return self._plan_futures[key]

    def _create(self, key, buffer: torch.Tensor) -> Window:
        future = self._plan_futures.pop(key, None)
        plan = future.result() if future is not None else self._window_plan(key)
        self._windows[key] = Window(self.source, plan, self._pool, self._buffers, buffer)
        self._planned(self._advance(*key))       # the next window's plan, while this one is read
        return self._windows[key]

    def _window(self, epoch: int, window: int) -> Window:
        """The window, its chunks' reads started when it is first asked for."""
        key = (epoch, window)
        return self._windows[key] if key in self._windows else self._create(key, self._buffers.acquire())

    def _read_ahead(self) -> None:
        """Start reading the next windows (one on CPU, two on CUDA, where host buffers are handed back
        after their upload), as free buffers allow; on CUDA, start uploading the current and next
        window as soon as they are read. Never waits."""
        current = self._ordinal(self.position[:2])
        newest = self._ordinal(next(reversed(self._windows))) if self._windows else current - 1
        while newest < current + self._ahead:
            buffer = self._buffers.try_acquire()
            if buffer is None:
                break
            newest += 1
            self._create(self._key(newest), buffer)
        if self.device.type == "cuda":
            for win in list(self._windows.values())[:2]:       # at most two windows on the device
                if win.uploaded is None and win.reads_done():
                    win.upload(self.device, self._stream)

    def _release(self, key) -> None:
        """Window `key` is served: its buffer takes the read-ahead."""
        self._windows.pop(key).release()
        self._read_ahead()

    def _start(self) -> None:
        cuda = self.device.type == "cuda"
        self._windows, self._served, self._plan_futures = {}, None, {}
        self._ahead = 2 if cuda else 1
        self._buffers.limit = self._ahead + 1
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        if not cuda:
            self._spare = torch.empty((self.batch_size, self.source.width), dtype=self._buffers.dtype)
            self._spare_raw = self._spare.numpy().view(self.source.numpy_dtype)
        self._plan = self._plans()
        self._window(*self.position[:2])
        self._read_ahead()

    # -- serving batches -------------------------------------------------------------------------
    # The reader threads put each window's rows in serving order, so a batch inside one window is a
    # slice of it. A batch that spans two windows (once per window) is copied together (numpy: a
    # torch copy would wake OpenMP threads that then spin on the readers' cores), and the older
    # window is released as soon as its rows are copied, so the read-ahead never waits on the
    # newer one. On CUDA each window is copied to the device once (pinned buffer, side stream,
    # asynchronous) and sliced there: the host only reads files.
    def next_batch(self) -> torch.Tensor:
        """The next batch [batch_size, width] in the stored dtype, on the loader's device.

        The tensor may be a view of the loader's window: it stays valid until the next call (clone it
        to keep it longer)."""
        cuda = self.device.type == "cuda"
        if self._plan is None:
            self._start()
        if self._served is not None:          # the last batch was a view of a finished window
            self._release(self._served)
            self._served = None
        parts, position = next(self._plan)
        self.position = position
        pieces, start = [], 0
        for epoch, w, lo, hi in parts:
            win = self._windows[(epoch, w)]
            if cuda:
                first_use = win.uploaded is None or lo == 0
                win.upload(self.device, self._stream)
                if first_use:                 # a wait here is the loader falling behind: let the host see it
                    win.uploaded.synchronize()
                torch.cuda.current_stream(self.device).wait_event(win.uploaded)
                rows = win.rows(lo, hi, "cuda")
            else:
                win.wait()
                rows = win.rows(lo, hi, "cpu")
            if len(parts) == 1 or cuda:
                pieces.append(rows)
            else:
                np.copyto(self._spare_raw[start:start + hi - lo], win.raw[lo:hi])
                start += hi - lo
            if hi == win.size:
                if len(parts) == 1:
                    self._served = (epoch, w)
                else:
                    self._release((epoch, w))
        self._read_ahead()
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if cuda else self._spare.view(self.source.torch_dtype)

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
        for future in getattr(self, "_plan_futures", {}).values():
            future.cancel()
        self._plan_futures = {}
        if getattr(self, "_windows", None):
            for win in self._windows.values():
                win.release()
            self._windows = {}

    def __del__(self):
        try:
            self.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._planner.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass

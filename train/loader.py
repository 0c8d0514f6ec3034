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

class BufferPool:
    """Host buffers for windows, reused so that reads do not fault fresh pages in (pinned on CUDA)."""

    def __init__(self, shape, dtype, pinned: bool):
        self.shape, self.dtype, self.pinned = shape, dtype, pinned
        self.free = []           # (tensor, CUDA event after which it may be overwritten, or None)
        self.lock = threading.Lock()

    def acquire(self) -> torch.Tensor:
        with self.lock:
            item = self.free.pop() if self.free else None
        if item is None:
            t = torch.empty(self.shape, dtype=self.dtype)
            return t.pin_memory() if self.pinned else t
        buf, done = item
        if done is not None:
            done.synchronize()
        return buf

    def release(self, buf: torch.Tensor, done=None) -> None:
        with self.lock:
            self.free.append((buf, done))


class Window:
    """Chunks of one window, read into one buffer by the reader pool, and the permutation to serve.

    On CUDA the whole window is copied to the device once (asynchronously, on a side stream) and
    batches are gathered there; on CPU batches are gathered from the host buffer."""

    def __init__(self, source: ActivationArray, chunk_ids: np.ndarray, servable: np.ndarray,
                 pool: ThreadPoolExecutor, buffers: BufferPool):
        rows = source.chunk_rows
        self.buffers, self.full = buffers, buffers.acquire()
        self.host = self.full[:len(chunk_ids) * rows]
        self.tensor = self.host.view(source.torch_dtype)     # views of one memory: no copies
        raw = self.host.numpy().view(source.numpy_dtype)
        self.order = torch.from_numpy(servable)
        self.futures = [pool.submit(source.read_chunk_into, int(c), raw[j * rows:(j + 1) * rows])
                        for j, c in enumerate(chunk_ids)]
        self.device_tensor = self.device_order = self.uploaded = None

    def reads_done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []

    def upload(self, device: torch.device, stream) -> None:
        """Start the asynchronous copy of the window (and its order) to `device`; once per window."""
        if self.uploaded is not None:
            return
        self.wait()
        main = torch.cuda.current_stream(device)
        stream.wait_stream(main)                # the device memory below is allocated on `main`
        self.device_tensor = torch.empty(self.tensor.shape, dtype=self.tensor.dtype, device=device)
        self.device_order = torch.empty(self.order.shape, dtype=self.order.dtype, device=device)
        with torch.cuda.stream(stream):
            self.device_tensor.copy_(self.tensor, non_blocking=True)
            self.device_order.copy_(self.order.pin_memory(), non_blocking=True)
            self.uploaded = torch.cuda.Event()
            self.uploaded.record(stream)
        self.device_tensor.record_stream(stream)
        self.device_order.record_stream(stream)

    def release(self) -> None:
        """Hand the host buffer back for reuse (after the device copy, if any, is done)."""
        self.wait()
        self.buffers.release(self.full, self.uploaded)


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
        host_dtype = torch.int16 if source.storage_dtype == "bfloat16" else torch.float32
        self._buffers = BufferPool((self.chunks_per_window * rows, source.width), host_dtype,
                                   pinned=self.device.type == "cuda")
        self._prefetch_batches = max(1, int(prefetch_batches))
        self._thread = None
        self._cuda_plans = None

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
        """Yield (parts, position after): parts = [(Window, lo, hi)]: rows order[lo:hi] of each window
        make one batch. The caller gathers a batch before asking for the next."""
        epoch, w, off = self.position

        def window(e, i):
            if (e, i) not in windows:
                ids = self.window_chunks(e, i)
                windows[(e, i)] = Window(self.source, ids, self.window_permutation(e, i, ids), self._pool,
                                         self._buffers)
            return windows[(e, i)]

        current = window(epoch, w)
        window(*self._advance(epoch, w))                 # read ahead
        while True:
            parts, need, finished = [], self.batch_size, []
            while need:
                take = min(need, len(current.order) - off)
                if take:
                    parts.append((current, off, off + take))
                    off, need = off + take, need - take
                if off == len(current.order):
                    finished.append(windows.pop((epoch, w)))
                    epoch, w, off = *self._advance(epoch, w), 0
                    current = window(epoch, w)
            yield parts, (epoch, w, off)
            for win in finished:             # its buffer may be refilled once this batch is gathered
                win.release()
            window(*self._advance(epoch, w))     # read ahead into it: two window buffers in all

    # -- serving batches -------------------------------------------------------------------------
    # CPU: a producer thread gathers batches from the host window while the step runs.
    # CUDA: each window is copied to the device once (pinned buffer, side stream, asynchronous) and
    # batches are gathered there: the host only reads files, and a batch is ready at once.
    def _start(self):
        self._stop = threading.Event()
        self._windows = {}
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._cuda_plans = self._plans(self._windows)
            return
        # A ring of batch buffers: fresh 10-100 MB allocations would fault their pages in on every
        # batch, which costs several times the gather itself. The consumer holds one slot, the
        # producer fills one, `prefetch_batches` wait ready.
        shape = (self.batch_size, self.source.width)
        self._ring = [torch.empty(shape, dtype=self.source.torch_dtype) for _ in range(self._prefetch_batches + 2)]
        self._ready, self._free = queue.Queue(), queue.Queue()
        for slot in range(len(self._ring)):
            self._free.put(slot)
        self._held = None
        self._thread = threading.Thread(target=self._produce, name="batch-producer", daemon=True)
        self._thread.start()

    def _produce(self):
        try:
            for parts, position in self._plans(self._windows):
                slot = self._free.get()
                if slot is None or self._stop.is_set():
                    return
                out, start = self._ring[slot], 0
                for win, lo, hi in parts:
                    win.wait()
                    # rows in buffer order: the same rows, a cheaper gather; order in a batch is irrelevant
                    torch.index_select(win.tensor, 0, win.order[lo:hi].sort().values, out=out[start:start + hi - lo])
                    start += hi - lo
                self._ready.put((slot, position))
        except BaseException as e:  # hand the error to the consumer
            self._ready.put((e, None))

    def _next_cuda(self) -> torch.Tensor:
        parts, position = next(self._cuda_plans)
        main = torch.cuda.current_stream(self.device)
        out = torch.empty((self.batch_size, self.source.width), dtype=self.source.torch_dtype, device=self.device)
        start = 0
        for win, lo, hi in parts:
            win.upload(self.device, self._stream)
            main.wait_event(win.uploaded)
            torch.index_select(win.device_tensor, 0, win.device_order[lo:hi], out=out[start:start + hi - lo])
            start += hi - lo
        for win in list(self._windows.values()):     # start copying read-ahead windows as soon as read
            if win.uploaded is None and win.reads_done():
                win.upload(self.device, self._stream)
        self.position = position
        return out

    def next_batch(self) -> torch.Tensor:
        """The next batch [batch_size, width] in the stored dtype, on the loader's device.

        On CPU the tensor is one of a ring of buffers: it stays valid until the next call (clone it
        to keep it longer)."""
        if self._thread is None and self._cuda_plans is None:
            self._start()
        if self._cuda_plans is not None:
            return self._next_cuda()
        if self._held is not None:
            self._free.put(self._held)
            self._held = None
        slot, position = self._ready.get()
        if isinstance(slot, BaseException):
            raise RuntimeError("the chunk loader failed") from slot
        self._held, self.position = slot, position
        return self._ring[slot]

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
            self._free.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        self._cuda_plans = None
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

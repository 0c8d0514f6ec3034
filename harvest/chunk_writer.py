"""Assembling one chunk's activations and writing it in the background while the device works on
the next chunk.

A chunk is written whole: `tokens`, every activation array, its statistics row, and only then
`complete[c]` (atomically). A chunk interrupted half-way is simply written again on resumption.
"""
from __future__ import annotations

import errno
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from .cache_layout import STATS_GROUP, CacheLayout
from .chunk_files import ChunkFiles
from .sites import Site
from .store import describe_store_error, is_store_error


class HarvestWriteError(RuntimeError):
    pass


def to_storage(act: torch.Tensor, storage_dtype: str) -> torch.Tensor:
    """bf16 activations as their raw 16 bits (int16 view; the cache stores them as uint16)."""
    if storage_dtype == "bfloat16":
        return act.to(torch.bfloat16).view(torch.int16)
    return act.to(torch.float32)


def from_storage(stored: torch.Tensor, storage_dtype: str) -> torch.Tensor:
    return stored.view(torch.bfloat16) if storage_dtype == "bfloat16" else stored


@dataclass
class ChunkBuffers:
    """Host buffers for one chunk (pinned when the model runs on CUDA), plus device-side stats."""
    tokens: np.ndarray
    acts: dict[Site, torch.Tensor]
    stats: dict[Site, torch.Tensor]      # float64 [width + 2]: sum x, sum ||x||^2, rows (non-BOS)
    storage_dtype: str = "bfloat16"
    index: int = -1
    ready: object = None   # a CUDA event recorded after the chunk's last copy, or None on CPU

    def put(self, site: Site, rows: slice, act: torch.Tensor) -> torch.Tensor:
        """Store `act` ([rows, width], any float dtype, on the model's device) in rows `rows` of the
        site's buffer; returns the stored values, on act's device, for the statistics."""
        host = self.acts[site][rows]
        if act.device.type == "cpu":
            stored = from_storage(host, self.storage_dtype)
            stored.copy_(act)          # one pass: cast straight into the chunk buffer
            return stored
        stored = to_storage(act, self.storage_dtype)      # on the device: half the bytes cross the bus
        host.copy_(stored, non_blocking=True)
        return from_storage(stored, self.storage_dtype)

    @classmethod
    def allocate(cls, layout: CacheLayout, pin: bool) -> "ChunkBuffers":
        dtype = torch.int16 if layout.storage_dtype == "bfloat16" else torch.float32
        acts = {s: torch.empty((layout.chunk_rows, w), dtype=dtype, pin_memory=pin)
                for s, w in zip(layout.sites, layout.widths)}
        stats = {s: torch.zeros(w + 2, dtype=torch.float64, pin_memory=pin)
                 for s, w in zip(layout.sites, layout.widths)}
        return cls(tokens=np.empty(layout.chunk_rows, dtype=np.int32), acts=acts, stats=stats,
                   storage_dtype=layout.storage_dtype)


class ChunkWriter:
    """Writes chunks handed to it by `submit`, in a background thread, `depth` chunks in flight.

    Buffers cycle through a free list, so the producer blocks (rather than allocating) when the
    disk falls behind. Errors in the thread are raised in the producer at its next call.
    """

    def __init__(self, group: zarr.Group, layout: CacheLayout, depth: int, pin: bool, durable: bool = True,
                 threads: int = 1, where: str | None = None):
        self.group, self.layout, self.durable = group, layout, durable
        self.where = where or str(group.store)
        # a chunk's files are independent: several threads copy into the page cache (and sync) at once
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="chunk-file-writer") if threads > 1 else None
        self.free: queue.Queue[ChunkBuffers] = queue.Queue()
        for _ in range(depth + 1):
            self.free.put(ChunkBuffers.allocate(layout, pin))
        self.todo: queue.Queue[ChunkBuffers | None] = queue.Queue()
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.tokens = ChunkFiles(group["tokens"])
        self.arrays = {s: ChunkFiles(group[s.key]) for s in layout.sites}
        self.stats_arrays = {s: ChunkFiles(group[f"{STATS_GROUP}/{s.key}"]) for s in layout.sites}
        self.complete = ChunkFiles(group["complete"])
        self.thread = threading.Thread(target=self._run, name="chunk-writer", daemon=True)
        self.thread.start()

    def _check(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise HarvestWriteError(
                    f"disk full while writing the cache at {self.group.store}: free some space and run "
                    "the same command again; it resumes from the last complete chunk") from e
            if is_store_error(e):
                raise HarvestWriteError(describe_store_error(e, self.where, "writing the cache at")
                                        + " The complete chunks are kept: run the same command again to resume "
                                        "from the last of them.") from e
            raise HarvestWriteError(f"writing the cache failed: {e!r}") from e

    def buffers(self) -> ChunkBuffers:
        while True:
            self._check()
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                continue

    def submit(self, buf: ChunkBuffers) -> None:
        self._check()
        self.todo.put(buf)

    def close(self) -> None:
        self.todo.put(None)
        while self.thread.is_alive():
            self.thread.join(timeout=0.5)
        if self.pool is not None:
            self.pool.shutdown()
        self._check()

    def _run(self) -> None:
        try:
            while (buf := self.todo.get()) is not None:
                self._write(buf)
                self.free.put(buf)
        except BaseException as e:   # surfaced in the producer thread
            self.error = e

    def _write(self, buf: ChunkBuffers) -> None:
        if buf.ready is not None:
            buf.ready.synchronize()
        c, bf16 = buf.index, self.layout.storage_dtype == "bfloat16"
        files = [(self.tokens, (c,), buf.tokens)]
        for site, array_files in self.arrays.items():
            data = buf.acts[site].numpy()
            files.append((array_files, (c, 0), data.view(np.uint16) if bf16 else data))
        files += [(f, (c, 0), buf.stats[site].numpy()[None]) for site, f in self.stats_arrays.items()]

        def write(job):
            target, coords, data = job
            return target.write(coords, data, sync=self.durable)
        sizes = list(self.pool.map(write, files) if self.pool is not None else map(write, files))
        self.bytes_written += sum(sizes[1:1 + len(self.arrays)])
        self.complete.write((c,), np.ones(1, dtype=bool), atomic=True)    # only once every file is written

"""Read the rows of a file straight to scattered destination rows: one copy, page cache to buffer.

A shuffled loader would otherwise copy every byte twice: file -> window buffer, then window ->
batch in random order. `preadv(2)` takes a list of (address, length) pairs and fills them from one
contiguous range of the file, so the shuffle can happen during the read: each row lands where the
window's permutation puts it, and batches are then contiguous slices of the window.

The iovec list is built with numpy (no Python object per row) and handed to libc through ctypes,
which releases the GIL for the call, so several reader threads copy at once.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

SCRATCH_ROWS = 16       # skipped runs up to this long are read into scratch; longer ones are seeked over


def _iov_max() -> int:
    try:
        return max(1, min(int(os.sysconf("SC_IOV_MAX")), 1024))
    except (AttributeError, ValueError, OSError):
        return 1024


def _libc_preadv():
    try:
        fn = ctypes.CDLL(None, use_errno=True).preadv
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong]
    fn.restype = ctypes.c_ssize_t
    return fn


_PREADV = _libc_preadv()
_IOV_MAX = _iov_max()


def available() -> bool:
    return _PREADV is not None


class ScatterPlan:
    """The preadv calls that put one file's rows where its slots say, for any destination buffer with
    rows of `row_bytes`: made ahead (on the loader's planner thread, for a whole window at once), so
    that a reader thread only adds its buffer's address and calls preadv, holding the GIL for
    microseconds instead of a dozen numpy passes."""
    __slots__ = ("iov", "into_out", "calls", "row_bytes", "max_slot")

    def __init__(self, iov, into_out, calls, row_bytes, max_slot):
        self.iov = iov              # [runs, 2] uint64: destination (offset in `out`, or scratch's address), bytes
        self.into_out = into_out    # [runs] uint64: 1 where the run lands in `out`, 0 into scratch
        self.calls = calls          # [(first run, end run, file offset in bytes, bytes)]
        self.row_bytes, self.max_slot = row_bytes, max_slot


_scratch_buffers: dict[int, np.ndarray] = {}


def _scratch(row_bytes: int) -> np.ndarray:
    """Where skipped rows are read to: shared by every thread (nobody reads it back)."""
    if row_bytes not in _scratch_buffers:
        _scratch_buffers[row_bytes] = np.empty(SCRATCH_ROWS * row_bytes, dtype=np.uint8)
    return _scratch_buffers[row_bytes]


def plan_scatter(slots: np.ndarray, row_bytes: int) -> list[ScatterPlan]:
    """One ScatterPlan per row of `slots` ([files, rows]; a 1-D array is one file): file row i ->
    destination row slots[f, i]; slots < 0: skipped."""
    slots = np.asarray(slots, dtype=np.int64)
    slots = slots.reshape(1, -1) if slots.ndim == 1 else slots
    n_files, rows = slots.shape
    if rows == 0:
        return [ScatterPlan(np.zeros((0, 2), np.uint64), np.zeros(0, np.uint64), [], row_bytes, -1)
                for _ in range(n_files)]
    # runs: maximal stretches of a file's rows that are all skipped, or land in consecutive rows
    skip = slots < 0
    starts = np.ones_like(skip)
    starts[:, 1:] = (skip[:, 1:] != skip[:, :-1]) | (~skip[:, 1:] & (slots[:, 1:] != slots[:, :-1] + 1))
    first = np.flatnonzero(starts)                       # over the flattened [file, row]
    length = np.diff(np.append(first, slots.size))       # runs never cross files: row 0 always starts one
    skipped = skip.ravel()[first]
    hole = skipped & (length > SCRATCH_ROWS)             # not read at all: the next call seeks past it
    into_out = (~skipped).astype(np.uint64)
    dest = np.where(skipped, _scratch(row_bytes).ctypes.data, np.maximum(slots.ravel()[first], 0) * row_bytes)
    iov = np.stack([dest.astype(np.uint64), (length * row_bytes).astype(np.uint64)], axis=1)
    file_of_run = first // rows
    bounds = np.searchsorted(file_of_run, np.arange(n_files + 1))
    max_slot = slots.max(axis=1)
    plans = []
    for f in range(n_files):
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        calls, call_start = [], lo
        # calls: between holes, at most IOV_MAX runs each
        for cut in [*(lo + np.flatnonzero(hole[lo:hi])).tolist(), hi]:
            for a in range(call_start, cut, _IOV_MAX):
                b = min(a + _IOV_MAX, cut)
                calls.append((a - lo, b - lo, int(first[a] - f * rows) * row_bytes, int(iov[a:b, 1].sum())))
            call_start = cut + 1
        plans.append(ScatterPlan(iov[lo:hi], into_out[lo:hi], calls, row_bytes, int(max_slot[f])))
    return plans


def run_scatter(fd: int, plan: ScatterPlan, out: np.ndarray, file_offset: int = 0) -> bool:
    """Carry out `plan` into `out` (C-contiguous, 2-D, rows of plan.row_bytes). Returns False when
    preadv is unavailable or the file is shorter than the plan (nothing is then promised about
    `out`); the caller falls back to another read."""
    if _PREADV is None or not out.flags.c_contiguous or out.ndim != 2:
        return False
    if out.shape[1] * out.itemsize != plan.row_bytes:
        raise ValueError(f"rows of {out.shape[1] * out.itemsize} bytes, the plan was made for {plan.row_bytes}")
    if plan.max_slot >= out.shape[0]:
        raise IndexError(f"destination row {plan.max_slot} outside a buffer of {out.shape[0]} rows")
    iov = plan.iov.copy()
    iov[:, 0] += plan.into_out * np.uint64(out.ctypes.data)
    base = iov.ctypes.data
    for a, b, offset, want in plan.calls:
        got = _PREADV(fd, base + a * 16, b - a, file_offset + offset)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if got != want:             # end of file (or an interrupted read): let the caller read another way
            return False
    return True


def scatter_read(fd: int, slots: np.ndarray, out: np.ndarray, file_offset: int = 0) -> bool:
    """File row i (rows of `out`'s row size, from `file_offset`) -> out[slots[i]]; slots[i] < 0: skipped.

    `out` must be C-contiguous and 2-D, and the destination slots distinct. Returns False when
    preadv is unavailable or the file is shorter than len(slots) rows (nothing is then promised
    about `out`); the caller falls back to another read."""
    if _PREADV is None or not out.flags.c_contiguous or out.ndim != 2:
        return False
    return run_scatter(fd, plan_scatter(slots, out.shape[1] * out.itemsize)[0], out, file_offset)

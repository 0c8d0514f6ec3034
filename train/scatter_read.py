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


def scatter_read(fd: int, slots: np.ndarray, out: np.ndarray, file_offset: int = 0) -> bool:
    """File row i (rows of `out`'s row size, from `file_offset`) -> out[slots[i]]; slots[i] < 0: skipped.

    `out` must be C-contiguous and 2-D, and the destination slots distinct. Returns False when
    preadv is unavailable or the file is shorter than len(slots) rows (nothing is then promised
    about `out`); the caller falls back to another read."""
    if _PREADV is None or not out.flags.c_contiguous or out.ndim != 2:
        return False
    slots = np.asarray(slots, dtype=np.int64)
    n, row_bytes = len(slots), out.shape[1] * out.itemsize
    if n == 0:
        return True
    if slots.max(initial=-1) >= out.shape[0]:
        raise IndexError(f"destination row {int(slots.max())} outside a buffer of {out.shape[0]} rows")
    # runs: maximal stretches of file rows that are all skipped, or land in consecutive rows of out
    skip = slots < 0
    starts = np.ones(n, dtype=bool)
    starts[1:] = (skip[1:] != skip[:-1]) | (~skip[1:] & (slots[1:] != slots[:-1] + 1))
    first = np.flatnonzero(starts)
    length = np.diff(np.append(first, n))
    skipped = skip[first]
    hole = skipped & (length > SCRATCH_ROWS)            # not read at all: the next call seeks past it
    scratch = np.empty(SCRATCH_ROWS * row_bytes, dtype=np.uint8)
    base = np.where(skipped, scratch.ctypes.data, out.ctypes.data + np.maximum(slots[first], 0) * row_bytes)
    iov = np.stack([base.astype(np.uint64), (length * row_bytes).astype(np.uint64)], axis=1)
    # calls: between holes, at most IOV_MAX runs each
    cuts = np.flatnonzero(hole)
    bounds = np.concatenate([[-1], cuts, [len(first)]])
    for lo, hi in zip(bounds[:-1] + 1, bounds[1:]):
        for a in range(int(lo), int(hi), _IOV_MAX):
            b = min(a + _IOV_MAX, int(hi))
            vec = np.ascontiguousarray(iov[a:b])
            want = int(vec[:, 1].sum())
            offset = file_offset + int(first[a]) * row_bytes
            got = _PREADV(fd, vec.ctypes.data, b - a, offset)
            if got < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            if got != want:         # end of file (or an interrupted read): let the caller read another way
                return False
    return True

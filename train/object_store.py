"""Reading a cache from an object store (`s3://bucket/prefix`, `gs://bucket/prefix`) through obstore.

Configured the standard way, from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL for S3-compatible stores; GOOGLE_APPLICATION_CREDENTIALS
for gs://), as the harvester writes it (harvest/store.py: `train` never imports `harvest`, so the few
lines that open a store are kept on both sides).

A chunk is fetched into memory and scattered into its destination rows with the same `slots` as a
local read: chunks larger than RANGE_BYTES are fetched as parallel ranged GETs of about that size
(one connection per range, as S3 advises for throughput), and rows nobody asked for (a held-out
sequence, when evaluation reads only those) are not fetched unless they sit in a gap shorter than
GAP_BYTES between wanted rows.
"""
from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np

RANGE_BYTES = 8 << 20
GAP_BYTES = 1 << 20
RANGE_THREADS = 16
RETRY_ENV = "JUMPSCOPE_STORE_RETRY_SECONDS"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def is_url(cache) -> bool:
    return _URL.match(str(cache)) is not None


def normalise_url(url: str) -> str:
    scheme, rest = _URL.match(url).groups()
    bucket, _, prefix = rest.partition("/")
    return f"{scheme.lower()}://{bucket}" + (f"/{prefix.strip('/')}" if prefix.strip("/") else "")


def _endpoint() -> str:
    return next((os.environ[n] for n in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
                 if os.environ.get(n)), "")


def open_object_store(url: str):
    """The obstore store whose prefix is `url`'s path. Raises ImportError without obstore."""
    from obstore.store import from_url
    kwargs = {}
    if url.startswith("s3://") and _endpoint().startswith("http://"):
        kwargs["client_options"] = {"allow_http": True}       # the user chose a plain-HTTP endpoint
    if os.environ.get(RETRY_ENV):
        kwargs["retry_config"] = {"max_retries": 10, "retry_timeout": timedelta(seconds=float(os.environ[RETRY_ENV]))}
    return from_url(url, **kwargs)


def store_error_message(e: BaseException, where: str) -> str:
    """What went wrong with a request to the store, and what to check."""
    text = str(e)
    code = m.group(1) if (m := re.search(r"<Code>([^<]+)</Code>", text)) else ""
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    at = f" at {_endpoint()}" if _endpoint() else ""
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken") or \
            type(e).__name__ == "UnauthenticatedError":
        return (f"{where}: the object store rejected the credentials ({code or 'unauthenticated'}); check "
                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (gs://: GOOGLE_APPLICATION_CREDENTIALS)")
    if code == "NoSuchBucket":
        return f"{where}: the bucket does not exist{at}"
    if code == "AccessDenied" or type(e).__name__ == "PermissionDeniedError":
        return f"{where}: permission denied{at}: these credentials may not read this prefix"
    if "error sending request" in text or "Connect" in text or "timed out" in text:
        return f"{where}: could not reach the object store{at} ({first}); check the network and AWS_ENDPOINT_URL"
    return f"{where}: {first}"


def is_store_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("obstore") or "Error performing" in str(e)


def _range_pool() -> ThreadPoolExecutor:
    """Threads that wait on ranged GETs (obstore releases the GIL while the request runs)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(RANGE_THREADS, thread_name_prefix="object-range-reader")
        return _pool


def fetch_plan(slots: np.ndarray, row_bytes: int) -> list[tuple[int, int]]:
    """[(first row, end row)] to fetch so that every row with slots >= 0 is covered: runs of wanted
    rows, joined across gaps under GAP_BYTES, cut into parts of at most RANGE_BYTES."""
    wanted = np.flatnonzero(np.asarray(slots) >= 0)
    if len(wanted) == 0:
        return []
    gap_rows, part_rows = max(1, GAP_BYTES // row_bytes), max(1, RANGE_BYTES // row_bytes)
    cuts = np.flatnonzero(np.diff(wanted) > gap_rows)
    starts, ends = wanted[np.r_[0, cuts + 1]], wanted[np.r_[cuts, len(wanted) - 1]] + 1
    plan = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        n_parts = -(-(b - a) // part_rows)
        edges = np.linspace(a, b, n_parts + 1).round().astype(int)     # parts of equal size
        plan += list(zip(edges[:-1].tolist(), edges[1:].tolist()))
    return plan


class ObjectChunks:
    """The chunk objects of one array in an object store: `<array path>/<chunk key>` under the store's prefix."""

    def __init__(self, store, array_path: str, metadata, width: int, itemsize: int, bare: bool):
        self.store, self.array_path, self.metadata = store, array_path, metadata
        self.row_bytes, self.bare = width * itemsize, bare

    def key(self, c: int) -> str:
        return f"{self.array_path}/{self.metadata.encode_chunk_key((c, 0))}"

    def read_into(self, c: int, out: np.ndarray, slots: np.ndarray, chunk_rows: int) -> bool:
        """Bare chunks: fetch the wanted rows of chunk c and put row i at out[slots[i]]; True.
        Other codecs: check that the object exists (zarr would read a missing one as zeros) and
        return False, for zarr to decode it. Raises FileNotFoundError for a missing object and
        ValueError for one of the wrong size."""
        import obstore
        key = self.key(c)
        if not self.bare:
            obstore.head(self.store, key)
            return False
        plan = fetch_plan(slots, self.row_bytes)
        want = chunk_rows * self.row_bytes
        fetch = lambda a, b: obstore.get(self.store, key, options={"range": (a * self.row_bytes, b * self.row_bytes)})
        parts = [_range_pool().submit(fetch, a, b) for a, b in plan]
        for (a, b), part in zip(plan, parts):
            got = part.result()
            if got.meta["size"] != want:
                raise ValueError(f"{got.meta['size']} bytes, expected {want}")
            data = np.frombuffer(got.bytes(), dtype=out.dtype).reshape(b - a, -1)
            dest = slots[a:b]
            keep = dest >= 0
            out[dest[keep]] = data[keep]
        return True

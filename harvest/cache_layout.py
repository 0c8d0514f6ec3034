"""The on-disk cache format, version 1 (shared/DESIGN.md, "The cache"): creating a cache, opening
an existing one for resumption, and finalising its statistics.

Only the process of rank 0 creates arrays and writes attributes; chunk data is written by the
process that owns the chunk (chunk_writer.py). No two processes ever write one file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import zarr

from .sites import Site
from .store import CacheLocation

FORMAT_VERSION = 1
STATS_GROUP = "chunk_stats"


class CacheMismatch(RuntimeError):
    pass


class ForeignCacheLocation(CacheMismatch):
    """CACHE names a folder (or object-store prefix) that holds other things and no cache."""


@dataclass(frozen=True)
class CacheLayout:
    sites: tuple[Site, ...]
    widths: tuple[int, ...]
    n_tokens: int
    context_length: int
    chunk_rows: int
    storage_dtype: str          # "bfloat16" (uint16 bits) or "float32"
    codec: str                  # none | zstd | blosc
    checksum: bool

    @property
    def n_chunks(self) -> int:
        return self.n_tokens // self.chunk_rows

    @property
    def itemsize(self) -> int:
        return 2 if self.storage_dtype == "bfloat16" else 4

    @property
    def activation_bytes(self) -> int:
        """Bytes of activations before compression (the upper bound on disk)."""
        return self.n_tokens * sum(self.widths) * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk of every array (tokens, activations, statistics) before compression."""
        return self.chunk_rows * (4 + sum(self.widths) * self.itemsize) + sum(8 * (w + 2) for w in self.widths)

    @property
    def total_bytes(self) -> int:
        return self.n_chunks * self.chunk_bytes


def chunk_rows_for(chunk_tokens: int, context_length: int) -> int:
    return max(1, -(-chunk_tokens // context_length)) * context_length


def _compressors(codec: str, checksum: bool, itemsize: int):
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec
    chosen = {
        "none": [],
        "zstd": [ZstdCodec(level=1)],
        "blosc": [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=itemsize)],
    }
    if codec not in chosen:
        raise ValueError(f"codec={codec!r}: choose none, zstd or blosc")
    return chosen[codec] + ([Crc32cCodec()] if checksum else [])


def create_cache(location: CacheLocation, layout: CacheLayout, attributes: dict,
                 group: zarr.Group | None = None) -> zarr.Group:
    """Create the group, every array (empty) and the attributes. With `group` (a cache whose creation
    was interrupted: the group exists, maybe not all of its arrays), create only the missing arrays."""
    if group is None:
        group = location.call("creating the cache in", zarr.create_group, store=location.zarr_store(),
                              zarr_format=3, attributes=attributes)
    have = set(_array_names(group))
    config = {"write_empty_chunks": True}

    def array(name, **kw):
        if name not in have:
            location.call("creating the cache in", group.create_array, name=name, fill_value=kw.pop("fill_value", 0),
                          config=config, **kw)

    array("tokens", shape=(layout.n_tokens,), chunks=(layout.chunk_rows,), dtype="int32",
          compressors=_compressors(layout.codec, layout.checksum, 4))
    dtype = "uint16" if layout.storage_dtype == "bfloat16" else "float32"
    for site, width in zip(layout.sites, layout.widths):
        array(site.key, shape=(layout.n_tokens, width), chunks=(layout.chunk_rows, width), dtype=dtype,
              compressors=_compressors(layout.codec, layout.checksum, layout.itemsize),
              attributes={"storage_dtype": layout.storage_dtype})
        # Per chunk: sum of x over non-BOS rows (width), sum of ||x||^2, number of rows.
        array(f"{STATS_GROUP}/{site.key}", shape=(layout.n_chunks, width + 2), chunks=(1, width + 2),
              dtype="float64", fill_value=0.0, compressors=None)
    array("complete", shape=(layout.n_chunks,), chunks=(1,), dtype="bool", fill_value=False, compressors=None)
    return group


def _array_names(group: zarr.Group) -> list[str]:
    return [name for name, _ in group.arrays()] + [f"{g}/{name}" for g, sub in group.groups()
                                                   for name in _array_names(sub)]


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so a mismatch names the exact setting."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(location: CacheLocation, identity, expected: dict) -> zarr.Group:
    """Open an existing cache for resumption, refusing one whose harvest identity (`identity(attrs)`,
    everything that decides the bytes) differs from `expected`."""
    path = str(location)
    group = location.call("opening", location.open_group, "r+")
    existing = dict(group.attrs)
    if existing.get("format_version") is None:
        raise CacheMismatch(f"{path} holds a Zarr group that is not a jumpscope cache (no format_version "
                            "attribute). Choose another CACHE; it was left untouched.")
    if existing.get("format_version") != FORMAT_VERSION:
        raise CacheMismatch(f"{path} holds a cache of format_version {existing.get('format_version')!r}; "
                            f"this harvester writes version {FORMAT_VERSION}. Use another CACHE.")
    have, want = _flatten(_canonical(identity(existing))), _flatten(_canonical(expected))
    differing = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if differing:
        lines = [f"  {k}: the cache has {json.dumps(have.get(k))[:300]}, this run asks for "
                 f"{json.dumps(want.get(k))[:300]}" for k in differing]
        raise CacheMismatch(f"{path} already holds a harvest with a different configuration:\n"
                            + "\n".join(lines)
                            + "\nChoose another CACHE, or delete that one to start over. It was left untouched.")
    return group


def refuse_foreign_location(where: str, is_cache: bool, entries: list[str] | None, total: int) -> None:
    """Refuse a CACHE that holds something other than a cache, before anything is written there:
    a harvest writes zarr.json, tokens/, layer_*/, ... and would scatter them among the files.
    `entries`: the names found there (folders with a trailing /), None when it is a file; `total`: how many."""
    if entries is None:
        raise ForeignCacheLocation(f"CACHE={where} is a file, not a folder: a cache is a folder (a Zarr group). "
                                   "Choose another CACHE; nothing was written.")
    if is_cache or total == 0:
        return
    shown = ", ".join(entries[:8]) + (f", ... ({total} in all)" if total > 8 else "")
    raise ForeignCacheLocation(
        f"CACHE={where} already holds {total} entr{'y' if total == 1 else 'ies'} and no cache ({shown}). A harvest "
        "writes a Zarr group (zarr.json, tokens/, layer_*/, complete/, ...) into CACHE, so CACHE must be absent, "
        "empty, or a cache. Choose a new folder (a subfolder of this one, say); nothing was written.")


def check_location(location: CacheLocation) -> bool:
    """refuse_foreign_location for CACHE; True when it holds a cache (or a Zarr group) to resume."""
    entries = location.entries()
    is_cache = entries is not None and "zarr.json" in entries
    refuse_foreign_location(str(location), is_cache, entries, 1 if entries is None else len(entries))
    return is_cache


def finalize_statistics(group: zarr.Group, layout: CacheLayout, location: CacheLocation) -> dict[str, dict]:
    """Reduce the per-chunk statistics (in chunk order, so any number of processes gives the same
    bits) into each activation array's attributes. Call once every chunk is complete. Attributes
    that already hold these values are not rewritten (a finished cache on a read-only prefix)."""
    summary = {}
    for site in layout.sites:
        stats = group[f"{STATS_GROUP}/{site.key}"][:]
        total = stats.sum(axis=0)
        n = total[-1]
        mean = total[:-2] / n
        msn = float(total[-2] / n)
        attrs = {
            "storage_dtype": layout.storage_dtype,
            "mean_squared_norm": msn,
            "variance": float(msn - float(np.dot(mean, mean))),   # E||x - E x||^2
            "mean_norm": float(np.linalg.norm(mean)),
            "statistics_rows": int(n),
        }
        if {k: group[site.key].attrs.get(k) for k in attrs} != attrs:
            location.call("updating the statistics in", group[site.key].attrs.update, attrs)
        summary[site.key] = attrs
    return summary

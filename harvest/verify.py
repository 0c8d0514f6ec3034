"""Check that every chunk marked complete has whole files: `python -m harvest.verify CACHE [--deep] [--repair]`.

A `complete` flag promises the chunk's files: tokens, every activation array and its statistics.
A file deleted by hand, or lost to a crash of a harvest run with `durable=false`, breaks that
promise, and zarr reads a missing chunk as zeros. This walks the complete chunks and reports each
missing file or file of the wrong size; `--deep` also decodes every chunk (checking crc32c where
the cache has it). `--repair` removes the flags of the damaged chunks, so that running the same
harvest command again rewrites them (and recomputes the statistics).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import zarr

from .cache_layout import STATS_GROUP
from .chunk_files import ChunkFiles
from .store import CacheLocation, ObjectStoreError


def _arrays(group: zarr.Group) -> list[tuple[str, zarr.Array, tuple]]:
    """(name, array, chunk coordinates suffix) of every array written chunk by chunk."""
    out = [("tokens", group["tokens"], ())]
    for key in group.attrs["sites"]:
        out += [(key, group[key], (0,)), (f"{STATS_GROUP}/{key}", group[f"{STATS_GROUP}/{key}"], (0,))]
    return out


def verify_cache(path: str | Path, deep: bool = False, repair: bool = False) -> dict[int, list[str]]:
    """{chunk: [problems]} for the complete chunks that are damaged; with repair, their flags are removed.
    `path`: a local folder or an object-store URL."""
    location = CacheLocation.parse(path)
    group = location.call("opening", location.open_group, "r+" if repair else "r")
    complete = np.flatnonzero(group["complete"][:])
    damaged: dict[int, list[str]] = {}
    for name, array, suffix in _arrays(group):
        files = ChunkFiles(array)
        size = files.encoded_size()
        rows = array.chunks[0]
        for c in complete:
            actual = location.call("reading", files.size, (int(c), *suffix))
            if actual is None:
                damaged.setdefault(int(c), []).append(f"{name}: file missing")
                continue
            if size is not None and actual != size:
                damaged.setdefault(int(c), []).append(f"{name}: {actual} bytes, expected {size}")
            elif deep:
                try:
                    array[int(c) * rows:(int(c) + 1) * rows]
                except Exception as e:          # a codec's or checksum's own error
                    damaged.setdefault(int(c), []).append(f"{name}: does not decode ({e})")
    if repair:
        flags = ChunkFiles(group["complete"])
        for c in damaged:
            location.call("removing flags in", flags.remove, (c,))
    return dict(sorted(damaged.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache")
    p.add_argument("--deep", action="store_true", help="also decode every complete chunk")
    p.add_argument("--repair", action="store_true", help="unflag damaged chunks so the harvest rewrites them")
    args = p.parse_args(argv)
    try:
        location = CacheLocation.parse(args.cache)
        if not location.has_group():
            print(f"error: no cache at {args.cache}", file=sys.stderr)
            return 2
        damaged = verify_cache(args.cache, deep=args.deep, repair=args.repair)
    except ObjectStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c, problems in damaged.items():
        print(f"chunk {c}: " + "; ".join(problems))
    if not damaged:
        print(f"{args.cache}: every complete chunk has whole files{' (decoded)' if args.deep else ''}")
        return 0
    print(f"{len(damaged)} damaged chunk(s)" + (": their flags are removed; run the same harvest command to "
                                                 "rewrite them" if args.repair else "; --repair unflags them"))
    return 1


if __name__ == "__main__":
    sys.exit(main())

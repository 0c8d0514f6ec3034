"""Write and read rates of a cache in an object store against local disk, side by side in one run
(BENCHMARKS.md, "Object stores").

    .venv/bin/python scripts/bench_object_store.py                      # moto's S3 server on 127.0.0.1
    .venv/bin/python scripts/bench_object_store.py --url s3://bucket/p  # a real store, from the environment

Write: a harvest of the tiny model into a local folder and into the store, and the same bytes
written plainly (one fsynced file; PUTs of whole objects with as many threads as the harvest uses).
Read: ChunkLoader's shuffled epochs from a local cache and from the same cache in the store, and
plain whole-object GETs of the same chunk objects (one thread, and as many as the loader has).
Without --url the store is moto on loopback: an in-memory Python server sharing the 2 cores with
the client, not S3; its figures say what the client costs and that it keeps up, not what S3 gives.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harvest.bench import raw_write_seconds  # noqa: E402
from harvest.config import compose_harvest_config  # noqa: E402
from harvest.run import default_write_threads, run_harvest  # noqa: E402
from harvest.store import CacheLocation  # noqa: E402
from train.bench import chunk_files, loader_rate, raw_read_rate, write_random_cache  # noqa: E402
from train import object_store  # noqa: E402
from train.cache_reader import open_activations  # noqa: E402

RANGE_BYTES = object_store.RANGE_BYTES


def clear(location: CacheLocation) -> None:
    if not location.remote:
        shutil.rmtree(location.path, ignore_errors=True)
        return
    import obstore
    for batch in obstore.list(location.object_store, chunk_size=1000):
        obstore.delete(location.object_store, [o["path"] for o in batch])


def upload(folder: Path, location: CacheLocation) -> None:
    import obstore
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: obstore.put(location.object_store, str(f.relative_to(folder)), f.read_bytes(),
                                            use_multipart=False), files))


def raw_put_seconds(location: CacheLocation, sizes: list[int], n_chunks: int, threads: int) -> float:
    """The harvest's objects (one per array per chunk, the same sizes) as plain PUTs, `threads` at once."""
    import obstore
    blobs = [np.random.default_rng(i).integers(0, 255, n, dtype=np.uint8).tobytes() for i, n in enumerate(sizes)]
    jobs = [(f"raw/{c}/{i}", blob) for c in range(n_chunks) for i, blob in enumerate(blobs)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda j: obstore.put(location.object_store, j[0], j[1], use_multipart=False), jobs))
    seconds = time.perf_counter() - start
    for batch in obstore.list(location.object_store, prefix="raw", chunk_size=1000):
        obstore.delete(location.object_store, [o["path"] for o in batch])
    return seconds


def raw_get_rate(location: CacheLocation, keys: list[str], rows_per_key: int, threads: int,
                 part_bytes: int | None = None, size: int = 0) -> float:
    """Rows/s of GETs of the objects `keys` (each `size` bytes), `threads` at once: whole objects, or
    ranges of about `part_bytes` (cut as the loader cuts them)."""
    import obstore
    store = location.object_store
    if part_bytes is None:
        jobs = [(k, None) for k in keys]
    else:
        n = -(-size // part_bytes)
        edges = np.linspace(0, size, n + 1).round().astype(int).tolist()
        jobs = [(k, (a, b)) for k in keys for a, b in zip(edges[:-1], edges[1:])]
    fetch = lambda j: obstore.get(store, j[0], options={"range": j[1]} if j[1] else None).bytes()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fetch, jobs))
    return len(keys) * rows_per_key / (time.perf_counter() - start)


def bench_write(args, out: Path, store: CacheLocation) -> dict:
    local = CacheLocation.parse(str(out / "harvest_local"))
    remote = CacheLocation.parse(f"{store.url}/harvest")
    overrides = ["model=tiny", f"n_tokens={args.tokens}", f"chunk_tokens={args.chunk_tokens}", "progress=false"]
    rows = {"harvest_local": [], "harvest_store": [], "raw_write_local": [], "raw_put_store": []}
    threads = default_write_threads(torch.device("cpu"), remote=True)
    for _ in range(args.repeats):           # alternated: the machine may be shared
        for key, where in (("harvest_local", local), ("harvest_store", remote)):
            clear(where)
            rows[key].append(run_harvest(compose_harvest_config([f"cache={where}", *overrides]))["seconds"])
        group = local.open_group("r")
        attrs = dict(group.attrs)
        sizes = [attrs["chunk_rows"] * 4] + [attrs["chunk_rows"] * group[k].shape[1] * group[k].dtype.itemsize
                                             for k in attrs["sites"]]
        rows["raw_write_local"].append(raw_write_seconds(out / "raw", sizes, attrs["n_chunks"], durable=True))
        rows["raw_put_store"].append(raw_put_seconds(store, sizes, attrs["n_chunks"], threads))
    nbytes = sum(sizes) * attrs["n_chunks"]
    med = {k: statistics.median(v) for k, v in rows.items()}
    clear(remote)
    return {"tokens": attrs["n_tokens"], "bytes": nbytes, "objects": len(sizes) * attrs["n_chunks"],
            "put_threads": threads, "seconds_median": med, "all_seconds": rows,
            "MB_per_s": {k: nbytes / 1e6 / v for k, v in med.items()},
            "store_over_local_harvest": med["harvest_store"] / med["harvest_local"]}


def bench_read(args, out: Path, store: CacheLocation) -> dict:
    path = out / "loader_cache"
    write_random_cache(path, args.d, args.chunks, args.chunk_rows, args.ctx)
    remote = CacheLocation.parse(f"{store.url}/loader")
    clear(remote)
    upload(path, remote)
    sources = {"local": open_activations(path, 0, "mlp_out"), "store": open_activations(remote.url, 0, "mlp_out")}
    files = chunk_files(path, sources["local"].name, args.chunks)
    keys = [str(f.relative_to(path)) for f in files]
    raw_read_rate(files, args.chunk_rows)                                         # warm the page cache
    row_bytes, size = args.d * 2, args.chunk_rows * args.d * 2
    readers = loader_rate(sources["local"], args.batch, args.buffer_tokens, args.readers, seed=0, epochs=0)[1]

    def loader(source, seed):             # rows read per second (the loader reads BOS rows, serves the rest)
        return loader_rate(source, args.batch, args.buffer_tokens, args.readers, seed=seed, epochs=2)[0] \
            * args.ctx / (args.ctx - 1)
    rows = {k: [] for k in ("raw_read_local", "loader_local", "raw_get_whole_1", "raw_get_whole_n",
                            "loader_store_whole", "raw_get_ranged", "loader_store")}
    for i in range(args.repeats):          # alternated: the machine may be shared
        rows["raw_read_local"].append(raw_read_rate(files, args.chunk_rows))
        rows["loader_local"].append(loader(sources["local"], i))
        rows["raw_get_whole_1"].append(raw_get_rate(remote, keys, args.chunk_rows, 1))
        rows["raw_get_whole_n"].append(raw_get_rate(remote, keys, args.chunk_rows, readers))
        object_store.RANGE_BYTES = size                     # one GET per chunk
        rows["loader_store_whole"].append(loader(sources["store"], i))
        object_store.RANGE_BYTES = RANGE_BYTES
        rows["raw_get_ranged"].append(raw_get_rate(remote, keys, args.chunk_rows, object_store.RANGE_THREADS,
                                                   RANGE_BYTES, size))
        rows["loader_store"].append(loader(sources["store"], i))
    med = {k: statistics.median(v) for k, v in rows.items()}
    clear(remote)
    return {"d": args.d, "chunks": args.chunks, "chunk_rows": args.chunk_rows, "chunk_MB": size / 1e6,
            "range_MiB": RANGE_BYTES / 2**20, "ranges_per_chunk": -(-size // RANGE_BYTES),
            "reader_threads": readers, "range_threads": object_store.RANGE_THREADS,
            "rows_per_s_median": med, "all_rows_per_s": rows,
            "MB_per_s": {k: v * row_bytes / 1e6 for k, v in med.items()},
            "loader_store_over_raw_ranged_gets": med["loader_store"] / med["raw_get_ranged"],
            "loader_store_whole_over_raw_whole_gets": med["loader_store_whole"] / med["raw_get_whole_n"],
            "loader_local_over_raw_read": med["loader_local"] / med["raw_read_local"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="s3://bucket/prefix or gs://bucket/prefix (default: start moto on 127.0.0.1)")
    p.add_argument("--out", default="bench_out/object_store", help="local scratch folder (the disk compared)")
    p.add_argument("--tokens", type=int, default=32768, help="tokens harvested (tiny model, every site)")
    p.add_argument("--chunk-tokens", type=int, default=8192, help="the harvest's chunk_tokens")
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--chunks", type=int, default=24)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--buffer-tokens", type=int, default=32768)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server, saved_env = None, dict(os.environ)
    if args.url is None:
        from tests.s3_server import BUCKET, start_server
        server = start_server()
        os.environ.update(server.env())
        args.url = f"s3://{BUCKET}/bench"
    store = CacheLocation.parse(args.url)
    try:
        result = {"store": "moto server (loopback, in-memory)" if server else args.url,
                  "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                  "write": bench_write(args, out, store), "read": bench_read(args, out, store)}
    finally:
        if server is not None:
            server.process.kill()
            os.environ.clear()
            os.environ.update(saved_env)
    w, r = result["write"], result["read"]
    print(f"object-store benchmark against {result['store']}, median of {args.repeats}")
    print(f"write: {w['tokens']:,} tokens of the tiny model, {w['bytes'] / 1e6:.0f} MB in {w['objects']} objects "
          f"({w['put_threads']} PUT threads)")
    for k, v in w["seconds_median"].items():
        print(f"  {k:<18} {v:7.2f} s  {w['MB_per_s'][k]:8.1f} MB/s")
    print(f"read: {args.chunks} chunks of {r['chunk_MB']:.1f} MB ({r['ranges_per_chunk']} ranged GETs of "
          f"<= {r['range_MiB']:.0f} MiB each), {r['reader_threads']} loader reader threads")
    for k, v in r["rows_per_s_median"].items():
        print(f"  {k:<20} {v:>12,.0f} rows/s  {r['MB_per_s'][k]:8.1f} MB/s")
    print(f"  loader from the store / the same ranged GETs = {r['loader_store_over_raw_ranged_gets']:.2f}; "
          f"whole objects: {r['loader_store_whole_over_raw_whole_gets']:.2f}; "
          f"local loader / raw reads = {r['loader_local_over_raw_read']:.2f}")
    (out / "object_store_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(out / "harvest_local", ignore_errors=True)
    return result


if __name__ == "__main__":
    main()

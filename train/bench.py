"""`python -m train.bench`: the trainer's benchmarks (BENCHMARKS.md, section "Trainer").

1. Loader: tokens/s of one shuffled epoch through ChunkLoader against plain sequential reads of the
   same chunk files (page cache warm for both), as a ratio. Target: >= 0.8.
2. Sweep: K SAEs in lock-step on one read of the cache against K separate runs of the same SAEs
   (one after another in this process), tokens/s of each.
Writes bench_out/train_bench.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from hydra import compose, initialize_config_dir

from . import config  # noqa: F401
from .cache_reader import open_activations
from .loader import ChunkLoader
from .loop import MemberSpec, train_members
from .members import member_configs

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def write_random_cache(path: Path, d: int, n_chunks: int, chunk_rows: int, ctx: int, layer=0, sublayer="mlp_out"):
    """A format-v1 cache of Gaussian bf16 activations, written chunk by chunk (bounded memory)."""
    n = n_chunks * chunk_rows
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update({"format_version": 1, "context_length": ctx, "chunk_rows": chunk_rows, "n_tokens": n,
                        "bos_token_id": 2, "storage_dtype": "bfloat16", "model": {"id": "bench-random"}})
    cfg = {"write_empty_chunks": True}
    tokens = group.create_array("tokens", shape=(n,), chunks=(chunk_rows,), dtype="int32", compressors=None,
                                fill_value=0, config=cfg)
    acts = group.create_array(f"layer_{layer}/{sublayer}", shape=(n, d), chunks=(chunk_rows, d), dtype="uint16",
                              compressors=None, fill_value=0, config=cfg,
                              attributes={"storage_dtype": "bfloat16", "mean_squared_norm": float(d)})
    gen = torch.Generator().manual_seed(0)
    for c in range(n_chunks):
        x = torch.randn(chunk_rows, d, generator=gen).to(torch.bfloat16)
        acts[c * chunk_rows:(c + 1) * chunk_rows] = x.view(torch.int16).numpy().view(np.uint16)
        t = np.full(chunk_rows, 7, dtype=np.int32)
        t[::ctx] = 2
        tokens[c * chunk_rows:(c + 1) * chunk_rows] = t
    complete = group.create_array("complete", shape=(n_chunks,), chunks=(1,), dtype="bool", compressors=None,
                                  fill_value=False, config=cfg)
    complete[:] = True
    return path


def chunk_files(path: Path, name: str, n_chunks: int) -> list[Path]:
    files = [path / name / "c" / str(c) / "0" for c in range(n_chunks)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"unexpected chunk key layout: {missing[0]} missing")
    return files


def raw_read_rate(files: list[Path], rows_per_file: int) -> float:
    """Rows/s of plain sequential whole-file reads into one reused buffer (the fastest plain read:
    `read()` into fresh memory swings with whether the allocator hands back faulted-in pages)."""
    buf = memoryview(bytearray(max(f.stat().st_size for f in files)))
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(buf)
    return len(files) * rows_per_file / (time.perf_counter() - start)


def loader_rate(source, batch: int, buffer_tokens: int, readers: int, seed: int, epochs: int = 3) -> tuple[float, int]:
    """Tokens/s served over `epochs` epochs after the first (steady state: the first epoch touches
    fresh buffer pages), and the reader threads the loader used."""
    loader = ChunkLoader(source, np.arange(source.n_chunks), [], batch, buffer_tokens, seed, readers)
    while loader.epoch == 0:
        loader.next_batch()
    served, start = 0, time.perf_counter()
    while loader.epoch <= epochs:
        loader.next_batch()
        served += batch
    rate = served / (time.perf_counter() - start)
    loader.close()
    return rate, loader.num_readers


def _matches(path: Path, d: int, n_chunks: int, chunk_rows: int) -> bool:
    try:
        a = zarr.open_group(str(path), mode="r")["layer_0/mlp_out"]
        return tuple(a.shape) == (n_chunks * chunk_rows, d) and a.chunks[0] == chunk_rows
    except Exception:
        return False


def bench_loader(args, out: Path) -> dict:
    path = out / "loader_cache"
    if args.rewrite or not _matches(path, args.d, args.chunks, args.chunk_rows):
        print(f"[bench] writing a {args.chunks} x {args.chunk_rows} x {args.d} bf16 cache to {path}")
        write_random_cache(path, args.d, args.chunks, args.chunk_rows, args.ctx)
    source = open_activations(path, 0, "mlp_out")
    files = chunk_files(path, source.name, source.n_chunks)
    raw_read_rate(files, args.chunk_rows)                                 # warm the page cache
    raw, shuffled, ratios = [], [], []
    for i in range(args.repeats):         # alternated pairs: the machine may be shared
        raw.append(float(np.median([raw_read_rate(files, args.chunk_rows) for _ in range(3)])))
        rate, threads = loader_rate(source, args.batch, args.buffer_tokens, args.readers, seed=i)
        shuffled.append(rate)
        # the loader skips BOS rows (1 / ctx) but reads them: compare rows read per second
        ratios.append(shuffled[-1] * args.ctx / (args.ctx - 1) / raw[-1])
    raw_rate, loader = float(np.median(raw)), float(np.median(shuffled))
    return {"d": args.d, "chunks": args.chunks, "chunk_rows": args.chunk_rows, "batch": args.batch,
            "buffer_tokens": args.buffer_tokens, "readers": args.readers, "reader_threads": threads,
            "bytes": int(sum(f.stat().st_size for f in files)),
            "raw_tokens_per_s": raw_rate, "loader_tokens_per_s": loader,
            "loader_rows_read_per_s": loader * args.ctx / (args.ctx - 1),
            "ratio": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "pairs": [{"raw": r, "loader": l} for r, l in zip(raw, shuffled)]}


def bench_sweep(args, out: Path) -> dict:
    path = out / "sweep_cache"
    if args.rewrite or not _matches(path, args.sweep_d, 8, 4096):
        write_random_cache(path, args.sweep_d, 8, 4096, args.ctx)
    lams = [1e-4 * 2 ** i for i in range(args.k)]
    base = [f"cache={path}", "layer=0", "sublayer=mlp_out", "train.progress=false", "train.tensorboard=false",
            f"loader.batch_size={args.sweep_batch}", f"train.total_tokens={args.sweep_steps * args.sweep_batch}",
            f"sae.width={args.sweep_width}", "train.checkpoint_every_steps=0", "train.resume=false",
            "train.log_every_steps=1000000", "loader.buffer_tokens=16384"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        sweep_cfg = compose("train_sweep", overrides=base + [f"run_dir={out / 'sweep_run'}",
                                                             f"sweep.grid.sae.sparsity_coeff={lams}"])
    members = member_configs(sweep_cfg)
    tokens = args.sweep_steps * args.sweep_batch
    sweep_times, separate_times = [], []
    for _ in range(args.repeats):          # alternated, best of each: the machine may be shared
        start = time.perf_counter()
        train_members(sweep_cfg, [MemberSpec(n, out / "sweep_run" / n, m) for n, m in members],
                      out / "sweep_run" / "ckpt.pt")
        sweep_times.append(time.perf_counter() - start)
        separate = []
        for i, (name, m) in enumerate(members):
            start = time.perf_counter()
            train_members(sweep_cfg, [MemberSpec(name, out / "separate" / name, m)], out / "separate" / f"ckpt{i}.pt")
            separate.append(time.perf_counter() - start)
        separate_times.append(separate)
    sweep_s = min(sweep_times)
    separate = min(separate_times, key=sum)
    return {"k": args.k, "d": args.sweep_d, "width": args.sweep_width, "batch": args.sweep_batch,
            "steps": args.sweep_steps, "sweep_seconds": sweep_s, "separate_seconds": separate,
            "sweep_tokens_per_s": tokens / sweep_s, "sweep_sae_tokens_per_s": args.k * tokens / sweep_s,
            "separate_tokens_per_s": [tokens / s for s in separate],
            "separate_sae_tokens_per_s": args.k * tokens / sum(separate),
            "speedup": sum(separate) / sweep_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/train")
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--chunks", type=int, default=24)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--buffer-tokens", type=int, default=32768)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--sweep-d", type=int, default=256)
    p.add_argument("--sweep-width", type=int, default=1024)
    p.add_argument("--sweep-batch", type=int, default=1024)
    p.add_argument("--sweep-steps", type=int, default=20)
    p.add_argument("--rewrite", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "loader": bench_loader(args, out)}
    lo = result["loader"]
    print(f"[bench] loader: raw sequential reads {lo['raw_tokens_per_s']:,.0f} tok/s, shuffled loader "
          f"{lo['loader_tokens_per_s']:,.0f} tok/s served ({lo['loader_rows_read_per_s']:,.0f} rows read/s): "
          f"ratio {lo['ratio']:.2f} ({lo['reader_threads']} reader threads; median of {args.repeats} pairs, {lo['ratio_min']:.2f} to {lo['ratio_max']:.2f}; "
          "target >= 0.8)")
    if not args.skip_sweep:
        result["sweep"] = sw = bench_sweep(args, out)
        print(f"[bench] sweep K={sw['k']} lock-step: {sw['sweep_tokens_per_s']:,.0f} tok/s "
              f"({sw['sweep_sae_tokens_per_s']:,.0f} SAE-tok/s); {sw['k']} separate runs: "
              + ", ".join(f"{r:,.0f}" for r in sw["separate_tokens_per_s"])
              + f" tok/s ({sw['separate_sae_tokens_per_s']:,.0f} SAE-tok/s); speed-up {sw['speedup']:.2f}x")
    (out / "train_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] wrote {out / 'train_bench.json'}")
    return result


if __name__ == "__main__":
    main()

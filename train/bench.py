"""`python -m train.bench`: the trainer's benchmarks (BENCHMARKS.md, section "Trainer").

1. Loader: tokens/s of shuffled epochs through ChunkLoader against plain sequential reads of the
   same chunk files (page cache warm for both), as a ratio, at the trainer's default batch and buffer
   and at a small window (several windows per epoch). Target: >= 0.8. Then tokens/s against threads
   (the loader's readers; raw reads, reads into window-sized buffers and a memcpy of the same bytes on
   as many threads: the ceiling memory bandwidth sets), and beside it what one SAE's fused training
   step consumes at the headline shape (timed on a GPU when there is one, else kernels/README.md's
   predicted floor).
2. Sweep: K SAEs in lock-step on one read of the cache against K separate runs of the same SAEs
   (one after another in this process), tokens/s of each.
Writes bench_out/train_bench.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from hydra import compose, initialize_config_dir

from . import config  # noqa: F401
from .cache_reader import open_activations
from .config import LoaderConfig
from .loader import ChunkLoader, usable_cores
from .loop import MemberSpec, train_members
from .members import member_configs

CONF = str(Path(__file__).resolve().parent.parent / "conf")
# kernels/README.md, "Two numbers": the fused step's predicted floor at B=4096, d=2304, W=16384 (H100
# SXM), and the 1.5x-of-floor target; one SAE consumes batch / step time.
STEP_FLOOR_MS = 0.65
STEP_TARGET_MS = 1.0


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


def raw_read_rate(files: list[Path], rows_per_file: int, threads: int = 1) -> float:
    """Rows/s of plain sequential whole-file reads, each thread into one reused chunk buffer (the
    fastest plain read; at 19 MB that buffer can stay in a large L3, which a loader's window cannot)."""
    def read(part):
        buf = memoryview(bytearray(max(f.stat().st_size for f in files)))
        for f in part:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(buf)
    return len(files) * rows_per_file / _timed_parts(read, files, threads)


def window_read_rate(files: list[Path], rows_per_file: int, windows: list[np.ndarray], threads: int = 1) -> float:
    """Rows/s of the same sequential reads, each chunk into its own rows of window-sized buffers
    (two, taken in turn): what a loader that did not shuffle would copy."""
    per_window = windows[0].shape[0] // rows_per_file

    def read(part):
        for i, f in part:
            w, j = divmod(i, per_window)
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(windows[w % 2][j * rows_per_file:(j + 1) * rows_per_file])
    return len(files) * rows_per_file / _timed_parts(read, list(enumerate(files)), threads)


def memcpy_rate(source: np.ndarray, rows_per_file: int, windows: list[np.ndarray], threads: int = 1) -> float:
    """Rows/s of copying the same bytes from memory into the window buffers (numpy, no page cache):
    the ceiling that memory bandwidth puts on any loader."""
    per_window = windows[0].shape[0] // rows_per_file
    n_chunks = source.shape[0] // rows_per_file

    def copy(part):
        for i in part:
            w, j = divmod(i, per_window)
            np.copyto(windows[w % 2][j * rows_per_file:(j + 1) * rows_per_file],
                      source[i * rows_per_file:(i + 1) * rows_per_file])
    return source.shape[0] / _timed_parts(copy, list(range(n_chunks)), threads)


def _timed_parts(work, items: list, threads: int) -> float:
    """Seconds for `threads` threads to run work(items[t::threads]) together."""
    if threads <= 1:
        start = time.perf_counter()
        work(items)
        return time.perf_counter() - start
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        for f in [pool.submit(work, items[t::threads]) for t in range(threads)]:
            f.result()
        return time.perf_counter() - start


def loader_rate(source, batch: int, buffer_tokens: int, readers: int, seed: int, epochs: int = 3,
                device: str = "cpu") -> tuple[float, int]:
    """Tokens/s served over `epochs` epochs after the first (steady state: the first epoch touches
    fresh buffer pages), and the reader threads the loader used. The consumer does nothing with the
    batches: this is what the loader can give."""
    loader = ChunkLoader(source, np.arange(source.n_chunks), [], batch, buffer_tokens, seed, readers, device)
    while loader.epoch == 0:
        loader.next_batch()
    served, start = 0, time.perf_counter()
    while loader.epoch <= epochs:
        loader.next_batch()
        served += batch
    if device != "cpu":
        torch.cuda.synchronize()
    rate = served / (time.perf_counter() - start)
    loader.close()
    return rate, loader.num_readers


def _matches(path: Path, d: int, n_chunks: int, chunk_rows: int) -> bool:
    try:
        a = zarr.open_group(str(path), mode="r")["layer_0/mlp_out"]
        return tuple(a.shape) == (n_chunks * chunk_rows, d) and a.chunks[0] == chunk_rows
    except Exception:
        return False


def _stats(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "runs": [float(v) for v in values]}


def loader_setting(args, source, files, batch: int, buffer_tokens: int) -> dict:
    """The loader against raw reads at one batch and buffer size, in alternated pairs."""
    raw, shuffled, ratios = [], [], []
    for i in range(args.repeats):         # alternated pairs: the machine may be shared
        raw.append(float(np.median([raw_read_rate(files, args.chunk_rows) for _ in range(3)])))
        rate, threads = loader_rate(source, batch, buffer_tokens, args.readers, seed=i)
        shuffled.append(rate)
        # the loader skips BOS rows (1 / ctx) but reads them: compare rows read per second
        ratios.append(shuffled[-1] * args.ctx / (args.ctx - 1) / raw[-1])
    loader = float(np.median(shuffled))
    window = min(source.n_chunks, max(1, buffer_tokens // args.chunk_rows))
    return {"batch": batch, "buffer_tokens": buffer_tokens, "window_chunks": window, "reader_threads": threads,
            "raw_tokens_per_s": float(np.median(raw)), "loader_tokens_per_s": loader,
            "loader_rows_read_per_s": loader * args.ctx / (args.ctx - 1),
            "ratio": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "pairs": [{"raw": r, "loader": s} for r, s in zip(raw, shuffled)]}


def thread_counts(cores: int) -> list[int]:
    return sorted({t for t in (1, 2, 4, 8, 16) if t <= cores} | {cores})


def loader_scaling(args, source, files) -> list[dict]:
    """Tokens/s against threads at the default setting: the loader with T readers, raw reads and
    window reads on T threads, and memcpy of the same bytes on T threads, alternated in each repeat."""
    rows = args.chunk_rows
    window = min(source.n_chunks, max(1, args.buffer_tokens // rows))
    buffers = [np.empty((window * rows, source.width), dtype=source.numpy_dtype) for _ in range(2)]
    for b in buffers:
        b.fill(0)                                             # fault the pages in before timing
    in_memory = np.concatenate([source.read_chunk_numpy(c) for c in range(source.n_chunks)])
    found = {t: {"loader": [], "raw": [], "window_reads": [], "memcpy": []} for t in thread_counts(usable_cores())}
    for i in range(args.scaling_repeats):
        for t, runs in found.items():
            runs["raw"].append(raw_read_rate(files, rows, t))
            runs["window_reads"].append(window_read_rate(files, rows, buffers, t))
            runs["memcpy"].append(memcpy_rate(in_memory, rows, buffers, t))
            rate, _ = loader_rate(source, args.batch, args.buffer_tokens, t, seed=i)
            runs["loader"].append(rate * args.ctx / (args.ctx - 1))     # rows read per second, as the others
    return [{"threads": t, **{k: _stats(v) for k, v in runs.items()}} for t, runs in found.items()]


def fused_step_consumption(batch: int) -> dict:
    """Tokens/s one SAE's fused training step consumes at the headline shape (d=2304, W=16384, L0~80):
    timed on the GPU when there is one, else kernels/README.md's predicted floor and target."""
    floor_ms, target_ms = STEP_FLOOR_MS, STEP_TARGET_MS
    found = {"batch": batch, "source": "kernels/README.md (predicted, H100 SXM)",
             "floor_ms": floor_ms, "target_ms": target_ms,
             "floor_tokens_per_s": batch / (floor_ms * 1e-3), "target_tokens_per_s": batch / (target_ms * 1e-3)}
    if torch.cuda.is_available():
        from kernels.bench import Timer, leaves, make_sae, training_step
        device = torch.device("cuda")
        x, params = make_sae(batch, 2304, 16384, 80, device)
        ms = Timer(device, quick=False)(training_step(x, leaves(params, torch.float32), "triton", "bf16"))
        found.update(source=f"measured on {torch.cuda.get_device_name()}", step_ms=ms,
                     step_tokens_per_s=batch / (ms * 1e-3))
    return found


def bench_loader(args, out: Path) -> dict:
    path = out / "loader_cache"
    if args.rewrite or not _matches(path, args.d, args.chunks, args.chunk_rows):
        print(f"[bench] writing a {args.chunks} x {args.chunk_rows} x {args.d} bf16 cache to {path}")
        write_random_cache(path, args.d, args.chunks, args.chunk_rows, args.ctx)
    source = open_activations(path, 0, "mlp_out")
    files = chunk_files(path, source.name, source.n_chunks)
    raw_read_rate(files, args.chunk_rows)                                 # warm the page cache
    found = {"d": args.d, "chunks": args.chunks, "chunk_rows": args.chunk_rows, "readers": args.readers,
             "bytes": int(sum(f.stat().st_size for f in files)), "cores": usable_cores(),
             "load_average": list(os.getloadavg())}
    found.update(loader_setting(args, source, files, args.batch, args.buffer_tokens))
    if args.small_buffer_tokens:
        found["small_window"] = loader_setting(args, source, files, args.batch, args.small_buffer_tokens)
    if args.scaling_repeats:
        found["scaling"] = loader_scaling(args, source, files)
    if torch.cuda.is_available():
        found["cuda_loader_tokens_per_s"] = loader_rate(source, args.batch, args.buffer_tokens, args.readers,
                                                        seed=0, device="cuda")[0]
    found["consumption"] = fused_step_consumption(args.batch)
    found["load_average_after"] = list(os.getloadavg())
    return found


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


def print_loader(lo: dict, repeats: int) -> None:
    settings = [lo] + ([lo["small_window"]] if "small_window" in lo else [])
    for st in settings:
        print(f"[bench] loader, batch {st['batch']}, buffer {st['buffer_tokens']:,} tokens ({st['window_chunks']} "
              f"chunks a window), {st['reader_threads']} reader threads: raw sequential reads "
              f"{st['raw_tokens_per_s']:,.0f} tok/s, loader {st['loader_tokens_per_s']:,.0f} tok/s served "
              f"({st['loader_rows_read_per_s']:,.0f} rows read/s): ratio {st['ratio']:.2f} (median of {repeats} "
              f"pairs, {st['ratio_min']:.2f} to {st['ratio_max']:.2f}; target >= 0.8)")
    if "scaling" in lo:
        print("[bench] rows/s (M, median) against threads: loader | raw reads | reads into windows | memcpy")
        for row in lo["scaling"]:
            print(f"[bench]   {row['threads']:>2} threads: " + " | ".join(
                f"{row[k]['median'] / 1e6:.2f}" for k in ("loader", "raw", "window_reads", "memcpy")))
    c = lo["consumption"]
    served = lo["loader_tokens_per_s"]
    line = (f"[bench] one SAE's fused step at d=2304, W=16384, B={c['batch']} ({c['source']}): floor "
            f"{c['floor_ms']} ms = {c['floor_tokens_per_s'] / 1e6:.1f}M tok/s, target {c['target_ms']} ms = "
            f"{c['target_tokens_per_s'] / 1e6:.1f}M tok/s")
    if "step_ms" in c:
        line += f"; measured {c['step_ms']:.3f} ms = {c['step_tokens_per_s'] / 1e6:.1f}M tok/s"
    need = c.get("step_tokens_per_s", c["target_tokens_per_s"])
    verdict = "keeps up" if served >= need else "does NOT keep up: the step would wait for data"
    print(line + f". Loader here: {served / 1e6:.2f}M tok/s on {lo['cores']} cores: {verdict}")
    if "cuda_loader_tokens_per_s" in lo:
        print(f"[bench] loader to CUDA (pinned window, upload, device slices): {lo['cuda_loader_tokens_per_s']:,.0f} tok/s")
    print(f"[bench] load average {lo['load_average'][0]:.2f} before, {lo['load_average_after'][0]:.2f} after")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/train")
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--chunks", type=int, default=24)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=LoaderConfig.batch_size)
    p.add_argument("--buffer-tokens", type=int, default=int(LoaderConfig.buffer_tokens))
    p.add_argument("--small-buffer-tokens", type=int, default=32768,
                   help="a second setting with several windows per epoch (0: skip)")
    p.add_argument("--readers", type=int, default=LoaderConfig.num_readers, help="0: one per usable core")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scaling-repeats", type=int, default=3, help="0: skip tokens/s against threads")
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
    print_loader(result["loader"], args.repeats)
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

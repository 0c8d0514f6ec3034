"""Harvest throughput against its two limits, measured side by side in one run (`make bench`).

A harvest cannot beat the slower of (a) the bare forward pass of the same model on the same tokens,
truncated at the same layer, and (b) writing the same bytes to the same disk with plain sequential
file writes (fsynced before the clock stops, since the harvest by default fdatasyncs every chunk).
Reported: harvest / max(forward, write). CPU: the tiny model, every sublayer of every layer. GPU:
random weights of gemma-2-2b's shape, three sublayers of every layer (Gemma Scope's att, mlp and res
sites).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from .config import compose_harvest_config
from .model import load_model
from .run import batch_sequences, run_harvest
from .sites import forward_until


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward_seconds(loaded, tokens: np.ndarray, ctx: int, batch: int, last_layer: int) -> float:
    model = loaded.model
    device = next(model.parameters()).device
    seqs = torch.from_numpy(tokens.reshape(-1, ctx).astype(np.int64))
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(seqs), batch):
            forward_until(model, seqs[b:b + batch].to(device, non_blocking=True), last_layer)
    _sync(device)
    return time.perf_counter() - t


def raw_write_seconds(folder: Path, chunk_bytes: list[int], n_chunks: int, durable: bool) -> float:
    """The same bytes as the cache (one write per array per chunk), sequentially into one file;
    durable (as the harvest's default): the clock stops once they are on the disk (fsync)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "raw.bin"
    blobs = [np.random.default_rng(i).integers(0, 255, n, dtype=np.uint8).tobytes() for i, n in enumerate(chunk_bytes)]
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n_chunks):
            for blob in blobs:
                f.write(blob)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_out", help="scratch folder on the disk to measure")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    out = Path(args.out)
    cache = out / "harvest_cache"
    if gpu:
        setting = "gemma-2-2b shape, random weights, attn_z+mlp_out+resid_post of all 26 layers"
        overrides = ["model=gemma-2-2b", "model.path=embedded:gemma-2-2b", "+model.architecture.seed=0",
                     "sublayers='attn_z,mlp_out,resid_post'", f"n_tokens={args.tokens or 32768}",
                     "batch_tokens=8192"]
    else:
        setting = "tiny Gemma 2, all 6 sublayers of all 4 layers"
        overrides = ["model=tiny", f"n_tokens={args.tokens or 65536}"]
    cfg = compose_harvest_config([f"cache={cache}", "progress=false", *overrides])
    loaded = None
    rows = {"harvest": [], "forward": [], "write": []}
    for _ in range(args.repeats):
        shutil.rmtree(cache, ignore_errors=True)
        summary = run_harvest(cfg)
        rows["harvest"].append(summary["seconds"])
        group = zarr.open_group(str(cache), mode="r")
        attrs = dict(group.attrs)
        tokens = group["tokens"][:]
        chunk_bytes = [attrs["chunk_rows"] * 4] + [
            attrs["chunk_rows"] * group[k].shape[1] * group[k].dtype.itemsize for k in attrs["sites"]]
        last_layer = max(int(k.split("/")[0].split("_")[1]) for k in attrs["sites"])
        if loaded is None:
            loaded = load_model(cfg.model, "cuda" if gpu else "cpu")
        rows["forward"].append(bare_forward_seconds(loaded, tokens, attrs["context_length"],
                                                    batch_sequences(cfg.batch_tokens, attrs["context_length"]), last_layer))
        rows["write"].append(raw_write_seconds(out, chunk_bytes, attrs["n_chunks"], cfg.durable))
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["harvest"] / max(med["forward"], med["write"])
    n = attrs["n_tokens"]
    result = {
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)",
        "setting": setting, "tokens": n, "bytes": sum(chunk_bytes) * attrs["n_chunks"],
        "seconds_median": med, "all_seconds": rows,
        "harvest_over_limit": ratio, "target": 1.10 if gpu else 1.15, "durable": cfg.durable,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"harvest benchmark: {setting}; {n:,} tokens, {result['bytes'] / 1e9:.2f} GB, median of {args.repeats}"
          f"{'; writes synced to disk' if cfg.durable else ''}")
    for k in ("harvest", "forward", "write"):
        print(f"  {k:<8} {med[k]:8.2f} s   {n / med[k]:>12,.0f} tok/s")
    print(f"  harvest / max(forward, write) = {ratio:.3f}  (target <= {result['target']})")
    (out / "harvest_bench.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()

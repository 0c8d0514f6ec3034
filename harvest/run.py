"""The harvest: model + corpus -> a format-v1 activation cache, on one or several processes."""
from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from .cache_layout import (CacheLayout, check_compatible, check_location, chunk_rows_for, create_cache,
                           finalize_statistics, FORMAT_VERSION)
from .chunk_files import remove_partial_files
from .chunk_writer import ChunkWriter
from .config import RUNTIME_ONLY_FIELDS, HarvestConfig, validate
from .documents import describe, iter_documents
from .model import load_model, load_model_config, resolve_device
from .packing import CorpusTooSmall, iter_sequences
from .sites import capture, forward_until, parse_layers, parse_sublayers, site_width, stored_sites
from .store import CacheLocation


class DiskSpaceError(RuntimeError):
    pass


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def identity(attrs: dict) -> dict:
    """What decides a cache's bytes: a resumed harvest must agree on all of it."""
    harvest = {k: v for k, v in (attrs.get("harvest_config") or {}).items() if k not in RUNTIME_ONLY_FIELDS}
    keys = ("format_version", "context_length", "chunk_rows", "n_tokens", "bos_token_id", "storage_dtype",
            "sites", "model", "model_revision", "checkpoint_hash", "model_config", "data_source", "compute")
    return {**{k: attrs.get(k) for k in keys}, "harvest_config": harvest}


def _software() -> dict:
    names = ("jumpscope", "torch", "transformers", "zarr", "numcodecs", "accelerate")
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def _distributed_state(device: torch.device):
    from accelerate import PartialState
    return PartialState(cpu=device.type == "cpu")


def run_harvest(cfg: HarvestConfig) -> dict:
    validate(cfg)
    location = CacheLocation.parse(cfg.cache)
    check_location(location)     # a folder (or prefix) of other things is refused before any work
    device = resolve_device(cfg.device)
    state = _distributed_state(device)
    if device.type == "cuda":
        device = state.device
    main = state.is_main_process
    say = print if main else (lambda *a, **k: None)

    # Everything that can be wrong is checked before the cache is touched.
    with state.main_process_first():   # the embedded model is built once, by rank 0
        hf_config = load_model_config(cfg.model)
    layers = parse_layers(cfg.layers, hf_config.num_hidden_layers)
    sublayers = parse_sublayers(cfg.sublayers)
    sites = stored_sites(layers, sublayers)
    last_layer = max(s.layer for s in sites)
    ctx = cfg.context_length or cfg.model.context_length
    chunk_rows = chunk_rows_for(cfg.chunk_tokens, ctx)
    n_tokens = -(-cfg.n_tokens // chunk_rows) * chunk_rows
    layout = CacheLayout(sites=tuple(sites), widths=tuple(site_width(hf_config, s.sublayer) for s in sites),
                         n_tokens=n_tokens, context_length=ctx, chunk_rows=chunk_rows,
                         storage_dtype=cfg.storage_dtype, codec=cfg.codec, checksum=cfg.checksum)

    loaded = load_model(cfg.model, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    sequences = iter_sequences(iter_documents(cfg.data, cfg.seed), tokenizer, ctx)
    first = next(sequences, None)
    if first is None:
        raise CorpusTooSmall(f"the corpus ({describe(cfg.data)}) does not fill one sequence of {ctx} tokens")

    # The cache's own path and how this run was executed (threads, queue, syncing, device choice,
    # progress bar) are left out: a cache may be moved or made differently, and stays byte-identical
    # to its twin.
    harvest_config = {k: v for k, v in asdict(cfg).items() if k != "cache" and k not in RUNTIME_ONLY_FIELDS} | {
        "n_tokens": n_tokens, "context_length": ctx}
    attrs = {
        "format_version": FORMAT_VERSION,
        "context_length": ctx,
        "chunk_rows": chunk_rows,
        "n_tokens": n_tokens,
        "n_chunks": layout.n_chunks,
        "bos_token_id": int(tokenizer.bos_token_id),
        "storage_dtype": cfg.storage_dtype,
        "codec": cfg.codec,
        "checksum": cfg.checksum,
        "sites": [s.key for s in sites],
        "layers": layers,
        "sublayers": sublayers,
        "model": loaded.provenance["model"],
        "model_revision": loaded.provenance["revision"],
        "checkpoint_hash": loaded.provenance["checkpoint_hash"],
        "model_config": loaded.provenance["model_config"],
        "tokenizer": loaded.provenance["tokenizer"],
        "compute": {k: loaded.provenance[k] for k in ("dtype", "attn_implementation", "device_type")},
        "data_source": describe(cfg.data),
        "harvest_config": harvest_config,
        "software": _software(),
    }

    resuming = location.has_group()
    # A cache from another harvest is refused before anything else (every rank: it only reads).
    group = check_compatible(location, identity, identity(attrs)) if resuming else None
    # What is already written follows from the complete flags: no walk over the chunk files.
    flags = location.call("reading", lambda: group["complete"][:]) if resuming and "complete" in group else None
    existing = int(flags.sum()) * layout.chunk_bytes if flags is not None else 0
    free = location.free_bytes()
    say(f"harvest {cfg.model.name} ({cfg.model.path}) -> {location}{'  [resuming]' if resuming else ''}\n"
        f"  {len(sites)} arrays over layers {layers[0]}..{last_layer}: {', '.join(sublayers)}\n"
        f"  {n_tokens:,} tokens{' (rounded up to whole chunks)' if n_tokens != cfg.n_tokens else ''} = "
        f"{n_tokens // ctx:,} sequences of {ctx} = {layout.n_chunks} chunks of {chunk_rows} rows; "
        f"{state.num_processes} process(es) on {device.type}\n"
        f"  {'in the object store' if location.remote else 'on disk'}: {_gb(layout.total_bytes)} "
        f"({cfg.storage_dtype}, codec {cfg.codec}; {_gb(existing)} already there)"
        + (f", free: {_gb(free)}" if free is not None else ""))
    if free is not None and layout.total_bytes - existing + cfg.min_free_bytes > free:
        raise DiskSpaceError(f"not enough disk space at {location}: the cache needs "
                             f"{_gb(layout.total_bytes - existing)} more, {_gb(free)} is free")

    state.wait_for_everyone()      # every rank has looked at the cache before rank 0 changes it
    if main:
        # a resumed cache gets the arrays an interrupted creation left out (none, almost always)
        group = create_cache(location, layout, attrs, group)
        if not location.remote:
            remove_partial_files(location.path / "complete")   # the only files written through a rename
    state.wait_for_everyone()
    if not main:
        group = location.call("opening", location.open_group, "r+")

    complete = location.call("reading", lambda: group["complete"][:])
    rank, world = state.process_index, state.num_processes
    mine = [c for c in range(layout.n_chunks) if c % world == rank and not complete[c]]
    say(f"  {int(complete.sum())} chunks already complete; {len(mine) * world} to go (approx. over all processes)")

    started = time.perf_counter()
    _harvest_chunks(cfg, layout, group, model, tokenizer.bos_token_id, device, first, sequences,
                    set(mine), last_layer, show=main and cfg.progress, location=location)
    state.wait_for_everyone()

    summary = {"cache": str(location), "n_tokens": n_tokens, "sites": [s.key for s in sites],
               "chunks_written": len(mine), "seconds": time.perf_counter() - started}
    if main:
        if not location.call("reading", lambda: group["complete"][:]).all():
            raise RuntimeError("some chunks are still incomplete after the harvest; run it again")
        summary["statistics"] = finalize_statistics(group, layout, location)
    return summary


@torch.no_grad()
def _harvest_chunks(cfg, layout, group, model, bos, device, first, sequences, todo, last_layer, show, location):
    R, ctx = layout.chunk_rows, layout.context_length
    per_chunk = R // ctx
    batch = batch_sequences(cfg.batch_tokens, ctx)
    pin = device.type == "cuda"
    threads = cfg.write_threads or default_write_threads(device, location.remote)
    writer = ChunkWriter(group, layout, depth=cfg.write_queue, pin=pin, durable=cfg.durable, threads=threads,
                         where=str(location))
    bar = tqdm(total=len(todo) * R, unit="tok", unit_scale=True, disable=not show, dynamic_ncols=True,
               desc="harvest")
    stream = _chain(first, sequences)
    try:
        with capture(model, layout.sites) as acts:
            for c in range(layout.n_chunks):
                seqs = [next(stream, None) for _ in range(per_chunk)]
                if seqs[-1] is None:
                    got = c * R + sum(s is not None for s in seqs) * ctx
                    raise CorpusTooSmall(f"the corpus ran out after {got:,} tokens; n_tokens asks for "
                                         f"{layout.n_tokens:,}. Lower TOKENS or add data.")
                if c not in todo:
                    continue
                buf = writer.buffers()
                buf.index = c
                buf.tokens[:] = np.concatenate(seqs)
                stats = {s: torch.zeros(w + 2, dtype=torch.float64, device=device)
                         for s, w in zip(layout.sites, layout.widths)}
                for b in range(0, per_chunk, batch):
                    ids = torch.from_numpy(np.stack(seqs[b:b + batch]))
                    # pinned, so the copy is asynchronous and the host runs ahead of the device
                    ids = (ids.pin_memory() if pin else ids).to(device, non_blocking=True)
                    forward_until(model, ids, last_layer)
                    rows = slice(b * ctx, b * ctx + ids.numel())
                    n_seq = ids.shape[0]
                    for site, width in zip(layout.sites, layout.widths):
                        stored = buf.put(site, rows, acts[site].reshape(-1, width))
                        _accumulate_statistics(stats[site], stored, n_seq)
                for site in layout.sites:
                    buf.stats[site].copy_(stats[site], non_blocking=True)
                if device.type == "cuda":
                    buf.ready = torch.cuda.Event()
                    buf.ready.record()
                writer.submit(buf)
                bar.update(R)
                bar.set_postfix_str(f"{writer.bytes_written / 1e9:.2f} GB written")
        writer.close()
    finally:
        bar.close()


def default_write_threads(device: torch.device, remote: bool) -> int:
    """Local disk on CPU: one (the forward needs the cores). Object stores: PUTs mostly wait on the
    network, so several are in flight at once. CUDA: up to 8."""
    if remote:
        return 8
    return 1 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) // 2))


def _accumulate_statistics(st: torch.Tensor, x: torch.Tensor, n_seq: int) -> None:
    """st[:-2] += sum of x, st[-2] += sum of ||x||^2, st[-1] += rows, over the non-BOS rows of x
    (the packer puts BOS at position 0 of every sequence and nowhere else).

    BOS rows are left out before summing (their norm dwarfs the rest). Float32 sums within each
    sequence, float64 across sequences and batches: about 1e-7 relative error, and several times
    cheaper than float64 throughout (bf16 -> float64 is not vectorised)."""
    body = x.view(n_seq, -1, x.shape[1])[:, 1:].float()
    st[:-2] += body.sum(1).double().sum(0)
    flat = body.reshape(n_seq, -1)
    st[-2] += torch.linalg.vecdot(flat, flat).double().sum()
    st[-1] += n_seq * body.shape[1]


def batch_sequences(batch_tokens: int, context_length: int) -> int:
    """Whole sequences per forward pass: batch_tokens rounded down, at least one."""
    return max(1, batch_tokens // context_length)


def _chain(first, rest):
    yield first
    yield from rest

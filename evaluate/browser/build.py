"""`make features RUN=...`: one pass over the held-out tokens of the SAE's cache, the logit lens of its
decoder, and the static browser written beside the run (conf/features.yaml)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import EvalInputError
from ..heldout import heldout_batches, non_bos_mask, open_site, select_heldout
from ..labels import architecture_label
from ..sources import EvalTarget, RunError, resolve
from train.cache_reader import open_cache
from . import resume
from .collect import FeatureCollector
from .logit_lens import logit_lens
from .site import MARKER, SiteWriter, write_marker, write_site


CODES_BUDGET = 2 ** 28      # elements of the [tokens, d_sae] codes of one encode (1 GB in float32)


class FeaturesError(EvalInputError):
    pass


def check_settings(cfg) -> None:
    """Settings that cannot work are refused before any work."""
    q = list(cfg.quantiles)
    problems = [f"{name}={getattr(cfg, name)} must be >= {low}" for name, low in
                (("top_contexts", 1), ("sample_size", 1), ("samples_per_band", 1), ("shard_latents", 1),
                 ("batch_sequences", 1), ("encode_tokens", 1), ("logit_tokens", 1), ("context_before", 0),
                 ("context_after", 0)) if getattr(cfg, name) < low]
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        problems.append(f"max_tokens={cfg.max_tokens} must be >= 1 (or null: every held-out token)")
    if len(q) < 2 or q != sorted(q) or q[0] < 0 or q[-1] > 1:
        problems.append(f"quantiles={q} must be at least two rising values in [0, 1]")
    if cfg.histogram_bins < 2 or cfg.histogram_bins & (cfg.histogram_bins - 1):
        problems.append(f"histogram_bins={cfg.histogram_bins} must be a power of two")
    if problems:
        raise FeaturesError("; ".join(problems))


def resolve_target(cfg) -> EvalTarget:
    """The one SAE cfg.run names (a sweep folder is refused, naming its members)."""
    settings = SimpleNamespace(run=cfg.run, layer=cfg.layer, sublayer=cfg.sublayer, cache=cfg.cache,
                               heldout_fraction=cfg.heldout_fraction, heldout_seed=cfg.heldout_seed)
    targets, is_sweep = resolve(settings, device=cfg.device)
    if is_sweep:
        members = ", ".join(t.name for t in targets[:8]) + (", ..." if len(targets) > 8 else "")
        raise RunError(f"run={cfg.run!r} is a sweep folder: the browser shows one SAE; pick a member, e.g. "
                       f"RUN={Path(cfg.run) / targets[0].name} (members: {members})")
    return targets[0]


def default_out(cfg) -> Path:
    if cfg.out:
        return Path(cfg.out)
    run = Path(cfg.run)
    if run.is_file():
        return run.parent / ("features" if run.name == "params.npz" else f"features_{run.stem}")
    return run / "features"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise FeaturesError(f"out={str(out)!r} exists and is not a feature browser (no {MARKER}): "
                            "choose another out= or empty it")


def _model_and_tokenizer(cache: str, device: str):
    """(model, tokenizer, note): the model the cache was harvested from, if it records one."""
    attrs = dict(open_cache(cache).attrs)
    if not isinstance(attrs.get("harvest_config"), dict) or "model" not in attrs["harvest_config"]:
        return None, None, (f"cache {cache!r} records no model: tokens are shown as ids and there is no "
                            "logit lens")
    from harvest.model import load_model_from_cache
    loaded = load_model_from_cache(cache, device=device)
    return loaded.model, loaded.tokenizer, None


def vocab_strings(tokenizer, vocab_size: int) -> list[str]:
    """What each token id looks like in text (ids the tokenizer does not know: '<id N>')."""
    known = len(tokenizer)
    return [tokenizer.decode([i]) if i < known else f"<id {i}>" for i in range(vocab_size)]


def collect(target: EvalTarget, cfg, device: torch.device, checkpoint: Optional[Path] = None):
    """The one pass: (CollectedFeatures, tokens [n, T] int32, cache sequence ids [n], source). With a
    checkpoint path, the state is saved there every cfg.checkpoint_every_s seconds and a matching
    saved state is resumed from."""
    source = open_site(target.cache, target.layer, target.sublayer)
    if target.sae.d_in != source.width:
        raise FeaturesError(f"width mismatch: the SAE reads {target.sae.d_in}-dimensional activations but the "
                            f"cache's {source.name} is {source.width} wide")
    seqs = select_heldout(source, target.heldout, cfg.max_tokens)
    T = source.context_length
    collector = FeatureCollector(target.sae.d_sae, cfg.top_contexts, cfg.sample_size, cfg.context_before,
                                 cfg.context_after, cfg.histogram_bins, cfg.seed, device)
    tokens_all = np.empty((len(seqs), T), dtype=np.int32)
    done = 0
    if checkpoint is not None:
        key = resume.fingerprint(target.sae, target.cache, target.layer, target.sublayer, target.heldout, cfg)
        state = resume.load(checkpoint, cfg.progress, key)
        if state is not None:
            collector.load_state_dict(state["collector"])
            done = int(state["done"])
            tokens_all[:done] = state["tokens"]
    per_encode = max(1, min(int(cfg.encode_tokens), CODES_BUDGET // target.sae.d_sae) // T)   # sequences
    bar = tqdm(total=len(seqs) * T, initial=done * T, desc=f"features: held-out tokens of {source.name}",
               unit="tok", unit_scale=True, disable=not cfg.progress)
    saved = time.time()
    for tokens, acts in heldout_batches(source, seqs[done:], cfg.batch_sequences):
        keep = non_bos_mask(tokens, source.bos_token_id)
        tokens_all[done:done + len(tokens)] = tokens.numpy()
        for lo in range(0, len(tokens), per_encode):
            x = acts[lo:lo + per_encode].to(device)
            b = len(x)
            f = target.sae.encode(x.reshape(b * T, -1)).reshape(b, T, -1)
            collector.update(f, keep[lo:lo + per_encode], torch.arange(done + lo, done + lo + b))
            del f
        done += len(tokens)
        bar.update(len(tokens) * T)
        if checkpoint is not None and cfg.checkpoint_every_s > 0 and time.time() - saved >= cfg.checkpoint_every_s:
            resume.save(checkpoint, key, done, tokens_all, collector)
            saved = time.time()
    bar.close()
    return collector.result(), tokens_all, seqs, source


def _meta(target: EvalTarget, cfg, stats, source, n_sequences: int, note: Optional[str], phases: dict) -> dict:
    return {"name": target.name, "source": str(target.path), "architecture": target.meta.get("architecture"),
            "label": architecture_label(target.meta), "model": str(target.meta.get("model") or ""),
            "layer": target.layer, "sublayer": target.sublayer, "cache": target.cache,
            "d_in": target.sae.d_in, "d_sae": target.sae.d_sae, "heldout": target.heldout,
            "n_sequences": n_sequences, "context_length": source.context_length, "n_tokens": stats.n_tokens,
            "dead": int((stats.count == 0).sum()),
            "dense": int((stats.frequency > cfg.dense_threshold).sum()), "dense_threshold": cfg.dense_threshold,
            "settings": {k: getattr(cfg, k) for k in ("max_tokens", "top_contexts", "sample_size", "quantiles",
                                                     "samples_per_band", "context_before", "context_after",
                                                     "histogram_bins", "logit_tokens", "seed")},
            "notes": [n for n in [note] if n], "seconds": {k: round(v, 2) for k, v in phases.items()},
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def build_browser(cfg) -> Path:
    """Build the browser of cfg.run; returns the folder holding index.html."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg.device)
    started = time.time()
    check_settings(cfg)
    target = resolve_target(cfg)
    out = default_out(cfg)
    _check_out(out)
    model, tokenizer, note = _model_and_tokenizer(target.cache, cfg.device)
    phases = {"load_s": time.time() - started}
    with torch.no_grad():
        t = time.time()
        stats, tokens, seqs, source = collect(target, cfg, device, resume.checkpoint_path(out))
        phases["collect_s"], t = time.time() - t, time.time()
        lens = None
        if model is not None:
            lens = logit_lens(model, target.sae.W_dec, target.layer, target.sublayer, cfg.logit_tokens,
                              progress=cfg.progress)
        phases["logit_lens_s"] = time.time() - t
    vocab = vocab_strings(tokenizer, model.config.vocab_size) if tokenizer is not None else None
    writer = SiteWriter(stats, tokens, seqs, lens, cfg.quantiles, cfg.samples_per_band)
    meta = _meta(target, cfg, stats, source, len(seqs), note, phases)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)           # mkdtemp makes it private; the browser is for sharing
    try:
        t = time.time()
        meta = write_site(staging, writer, meta, vocab, cfg.shard_latents, cfg.progress)
        meta["seconds"]["write_s"] = round(time.time() - t, 2)
        write_marker(staging, meta)
        _swap_in(staging, out)
        resume.checkpoint_path(out).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _swap_in(staging: Path, out: Path) -> None:
    """Replace out by staging; the old browser is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{int(time.time() * 1000)}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

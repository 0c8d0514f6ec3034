"""The training loop: K members (SAEs) in lock-step on the same batches; a single run is a sweep of one.

Each step reads one batch from the cache, normalises it once, and steps every member on it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import kernels

from .cache_reader import (HELDOUT_RULE, CacheError, cache_identifier, complete_heldout_sequences,
                           heldout_sequences, open_activations, open_cache)
from .checkpoint import load_checkpoint, save_checkpoint, set_rng_states
from .loader import ChunkLoader
from .member import Member, uses_median_norm
from .members import MEMBER_TRAIN_FIELDS
from .metrics import MetricsLog
from .run_folder import save_sae


@dataclass
class MemberSpec:
    name: str
    folder: Path
    cfg: object     # DictConfig with sections sae, optim, train (the member's resolved config)


class TrainingDiverged(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return device


CACHE_IDENTITY_KEYS = ("model", "checkpoint_hash", "data_source", "n_tokens", "context_length", "chunk_rows",
                       "bos_token_id", "storage_dtype")


def fingerprint(cfg, specs) -> dict:
    """What must not change between a checkpoint and the run that resumes from it. The cache is
    named by its path and by the group attributes that say what was harvested into it, so that a
    different harvest written to the same path is not silently trained on."""
    loader = OmegaConf.to_container(cfg.loader)
    loader.pop("num_readers")
    loader.pop("require_complete")
    t = cfg.train
    attrs = open_cache(cfg.cache).attrs
    return {"cache": cache_identifier(cfg.cache), "layer": cfg.layer, "sublayer": cfg.sublayer,
            "cache_identity": {k: attrs.get(k) for k in CACHE_IDENTITY_KEYS},
            "loader": loader, "total_tokens": t.total_tokens, "seed": t.seed,
            "dead_window_tokens": t.dead_window_tokens, "latent_stats_every": t.latent_stats_every,
            "members": [[s.name, OmegaConf.to_container(s.cfg.sae), _optim_fields(s.cfg.optim)]
                        + _own_train_fields(s.cfg.train, t) for s in specs]}


def _optim_fields(optim) -> dict:
    """The member's optim section; without the resampling fields where it does not resample (so that
    checkpoints written before resampling existed still resume)."""
    fields = OmegaConf.to_container(optim)
    if not fields["resample_every_steps"]:
        fields = {k: v for k, v in fields.items() if not k.startswith("resample_")}
    return fields


def _own_train_fields(member_train, train) -> list:
    """[the member's own train.* fields] where they differ from the sweep's, else [] (so that checkpoints
    written before members could set them still resume)."""
    own = {k: member_train[k] for k in MEMBER_TRAIN_FIELDS if member_train[k] != train[k]}
    return [own] if own else []


def train_members(cfg, specs: list[MemberSpec], checkpoint_path: Path, extra_meta: dict | None = None):
    """Train every member of `specs` to cfg.train.total_tokens. Returns {name: final metrics}, or None
    when the run stopped early (train.max_steps_this_run) with a checkpoint to resume from."""
    kernels.require_ours()
    t = cfg.train
    source = open_activations(cfg.cache, cfg.layer, cfg.sublayer)
    n_complete = int(source.complete.sum())
    if n_complete < source.n_chunks:
        if cfg.loader.require_complete:
            raise CacheError(f"cache {cfg.cache!r} is incomplete: {n_complete} of {source.n_chunks} chunks "
                             "complete, and loader.require_complete=true")
        print(f"[train] cache incomplete: training on the {n_complete} complete chunks of {source.n_chunks}")
    if n_complete == 0:
        raise CacheError(f"cache {cfg.cache!r} has no complete chunk")

    device = resolve_device(t.device)
    batch = cfg.loader.batch_size
    total_steps = int(t.total_tokens) // batch
    if total_steps < 1:
        raise ValueError(f"train.total_tokens={t.total_tokens} is less than one batch ({batch})")

    ckpt = load_checkpoint(checkpoint_path) if t.resume else None
    fp = fingerprint(cfg, specs)
    if ckpt is not None:
        # keys added to the fingerprint after a checkpoint was written are not held against it
        changed = sorted(k for k in fp if k in ckpt["fingerprint"] and ckpt["fingerprint"][k] != fp[k])
        if changed:
            raise ValueError(f"{checkpoint_path} was written with a different config (differs in: "
                             f"{', '.join(changed)}). Use another run_dir, or train.resume=false to start over.")

    msn = ckpt.get("mean_squared_norm") if ckpt else None
    if msn is not None:
        if source.mean_squared_norm is not None and source.mean_squared_norm != msn:
            print(f"[train] the cache's mean_squared_norm is now {source.mean_squared_norm:.6g}; the resumed run "
                  f"keeps the {msn:.6g} it started with")
    elif source.mean_squared_norm is not None:
        msn = source.mean_squared_norm
    else:
        msn = source.estimate_mean_squared_norm()
        print(f"[train] {source.name} has no mean_squared_norm attribute; estimated {msn:.6g} from a sample")
    scale = math.sqrt(msn)               # x_normalised = x / scale has E||x||^2 = 1
    held = heldout_sequences(source.n_sequences, cfg.loader.heldout_fraction, cfg.loader.heldout_seed)
    chunks = ckpt["loader"]["chunks"] if ckpt else [int(c) for c in source.complete.nonzero()[0]]
    if ckpt and not source.complete[chunks].all():
        raise CacheError("chunks the checkpointed run trained on are no longer complete in the cache")
    loader = ChunkLoader(source, chunks, held, batch, cfg.loader.buffer_tokens, cfg.loader.seed,
                         cfg.loader.num_readers, device)
    epochs = total_steps * batch / loader.rows_per_epoch
    if epochs > 1 and not ckpt:
        print(f"[train] {int(t.total_tokens):,} tokens is {epochs:.2f} epochs of the {loader.rows_per_epoch:,} "
              "training tokens in the cache")

    median_norm = ckpt.get("median_norm") if ckpt else None
    if median_norm is None and any(uses_median_norm(s.cfg) for s in specs):
        median_norm = source.estimate_median_norm() / scale
        print(f"[train] median token norm {median_norm:.4g} (normalised): the unit of the constants of "
              "members whose sae.constants_unit includes it")
    members = [Member(s.name, s.folder, s.cfg, source.width, total_steps, device, cfg.kernel_backend, median_norm)
               for s in specs]
    for m in members:
        acting_tokens = m.dead_loss_steps * batch
        if m.sae.uses_dead_mask and m.cfg.train.dead_window_tokens >= acting_tokens:
            print(f"[train] {m.name}: its loss on dead latents (pre-activation loss, AuxK) acts on latents dead for "
                  f"train.dead_window_tokens="
                  f"{m.cfg.train.dead_window_tokens:g} tokens, more than the {acting_tokens:,} of this run it acts in: "
                  "it will never act (set a shorter window)")
        o = m.cfg.optim
        if o.resample_every_steps > 0 and m.cfg.train.dead_window_tokens >= o.resample_until_fraction * total_steps * batch:
            print(f"[train] {m.name}: it resamples latents dead for train.dead_window_tokens="
                  f"{m.cfg.train.dead_window_tokens:g} tokens, but only in the first {o.resample_until_fraction:g} of "
                  f"this run's {total_steps * batch:,} tokens: none will be (set a shorter window)")
    start = 0
    if ckpt is not None:
        if ckpt.get("finished"):
            print(f"[train] {checkpoint_path} says this run is finished; nothing to do (train.resume=false to redo)")
            loader.close()
            return ckpt["final_metrics"]
        for m, state in zip(members, ckpt["members"]):
            m.load_state_dict(state)
        loader.load_state_dict(ckpt["loader"])
        set_rng_states(ckpt["rng"])
        start = ckpt["step"]
        print(f"[train] resuming from {checkpoint_path} at step {start}")
    for m in members:
        m.log = MetricsLog(m.folder, t.tensorboard, resume_step=start if ckpt else None)

    def checkpoint(step, finished=False, final_metrics=None):
        save_checkpoint(checkpoint_path, {
            "step": step, "fingerprint": fp, "mean_squared_norm": msn, "median_norm": median_norm, "members": [m.state_dict() for m in members],
            "loader": loader.state_dict(), "finished": finished, "final_metrics": final_metrics})
        return step

    last_good = start if ckpt else None
    interval_start, interval_time, metrics = start, time.perf_counter(), {}
    data_wait = 0.0          # seconds of this log interval spent in loader.next_batch (waiting for data)

    def check_finite(upto):
        for m in members:
            bad = m.first_nonfinite(interval_start)
            if bad is not None:
                where = (f"the last good checkpoint is {checkpoint_path} (step {last_good})" if last_good is not None
                         else "no checkpoint was written yet")
                raise TrainingDiverged(f"member {m.name!r}: non-finite loss at step {bad}; stopped at step {upto}; "
                                       f"{where}")

    bar = tqdm(total=total_steps * batch, initial=start * batch, unit="tok", unit_scale=True,
               disable=not t.progress, mininterval=1.0, desc=f"{source.name} x{len(members)}", dynamic_ncols=True)
    stopped_early = False
    try:
        step = start
        while step < total_steps:
            asked = time.perf_counter()
            x = loader.next_batch()
            data_wait += time.perf_counter() - asked
            x = x.to(torch.float32).div_(scale)   # (float32 storage: the loader slot, in place; fine: it is ours until the next call)
            variance = (x - x.mean(0)).pow(2).sum(-1).mean()
            track = step % t.latent_stats_every == 0
            for m in members:
                m.step(x, step, variance, track)
            step += 1
            bar.update(batch)
            if step % t.log_every_steps == 0 or step == total_steps:
                check_finite(step)
                elapsed = time.perf_counter() - interval_time
                tokens_per_s = (step - interval_start) * batch / max(elapsed, 1e-9)
                data_wait_fraction = min(1.0, data_wait / max(elapsed, 1e-9))
                for m in members:
                    metrics[m.name] = {**m.pop_metrics(), "tokens": step * batch, "epoch": loader.epoch,
                                       "tokens_per_s": tokens_per_s, "data_wait_fraction": data_wait_fraction}
                    m.log.write(step, metrics[m.name])
                first = metrics[members[0].name]
                bar.set_postfix(loss=f"{first['loss']:.4g}", fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}")
                interval_start, interval_time, data_wait = step, time.perf_counter(), 0.0
            save_now = t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0
            stop_now = t.max_steps_this_run and step - start >= t.max_steps_this_run
            if step < total_steps and (save_now or stop_now):
                check_finite(step)
                last_good = checkpoint(step)
                if stop_now:
                    stopped_early = True
                    break
    finally:
        bar.close()
        loader.close()
        for m in members:
            if m.log is not None:
                m.log.close()
    if stopped_early:
        print(f"[train] stopped after {t.max_steps_this_run} steps at step {step}; rerun the same command to resume")
        return None

    meta_common = {**run_metadata(cfg, source, scale, msn, held, len(chunks), total_steps, epochs, device),
                   **(extra_meta or {})}
    if median_norm is not None:
        meta_common["normalisation"]["median_norm"] = median_norm
    final = {}
    for m, s in zip(members, specs):
        final[m.name] = metrics.get(m.name, {})
        meta = {**meta_common, "name": m.name,
                "hyperparameters_train": {"sae": OmegaConf.to_container(s.cfg.sae),
                                          "optim": OmegaConf.to_container(s.cfg.optim),
                                          "loader": OmegaConf.to_container(cfg.loader),
                                          "train": OmegaConf.to_container(s.cfg.train)},
                "final_metrics": final[m.name]}
        save_sae(m.folder, m.sae.folded(scale).cpu(), meta)
    checkpoint(total_steps, finished=True, final_metrics=final)
    return final


def run_metadata(cfg, source, scale, msn, held, n_chunks_used, total_steps, epochs, device) -> dict:
    """What sae.json records about the data and the run, beyond the SAE itself (shared/DESIGN.md)."""
    heldout = {"fraction": cfg.loader.heldout_fraction, "seed": cfg.loader.heldout_seed}
    batch = cfg.loader.batch_size
    return {
        "model": open_cache(cfg.cache).attrs.get("model"),
        "layer": int(cfg.layer), "sublayer": cfg.sublayer, "cache": cache_identifier(cfg.cache),
        "cache_array": source.name,
        "normalisation": {"scale": scale, "mean_squared_norm": msn,
                          "rule": "trained on x / scale (E||x||^2 = 1); stored tensors are in raw units"},
        "heldout": {**heldout, "n_sequences": source.n_sequences, "count": int(len(held)), "rule": HELDOUT_RULE,
                    "function": "train.cache_reader.heldout_sequences_of_cache(cache, sae_json['heldout'])",
                    "complete_count": int(len(complete_heldout_sequences(source, heldout)))},
        "training": {"steps": total_steps, "tokens": total_steps * batch, "batch_size": batch, "epochs": epochs,
                     "complete_chunks_used": n_chunks_used, "n_chunks": source.n_chunks,
                     "kernel_backend": cfg.kernel_backend, "device": str(device)},
    }

"""Evaluate SAEs on the held-out sequences of their cache: reconstruction metrics, then delta LM loss.

SAEs sharing a cache, site and held-out rule (a sweep) share one read of the held-out activations and
one loaded model.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Optional

import torch
from tqdm.auto import tqdm

from .delta_lm import delta_lm_losses
from .errors import EvalInputError
from .heldout import heldout_batches, non_bos_mask, open_site, select_heldout
from .reconstruction import ReconstructionAccumulator
from .saebench import SAEBenchAccumulator, counted_tokens, ignored_token_ids, saebench_metrics
from .sources import EvalTarget


def _load_model(cache: str, device: str):
    """The model the cache was harvested from, or (None, reason) when the cache records none."""
    from harvest.model import load_model_from_cache
    attrs = _cache_attrs(cache)
    if not isinstance(attrs.get("harvest_config"), dict) or "model" not in attrs["harvest_config"]:
        return None, (f"cache {cache!r} records no model (harvest_config.model): not harvested from a "
                      "model, so there is no language model loss to measure")
    return load_model_from_cache(cache, device=device).model, None


def _cache_attrs(cache: str) -> dict:
    from train.cache_reader import open_cache      # a local folder or an object-store URL
    return dict(open_cache(cache).attrs)


def evaluate_targets(targets: list[EvalTarget], cfg) -> list[dict]:
    """One result dict per target (in order): {"reconstruction": metrics, "delta_lm": dict, ...}."""
    groups = defaultdict(list)
    for i, t in enumerate(targets):
        groups[(t.cache, t.layer, t.sublayer, t.heldout["fraction"], t.heldout["seed"])].append(i)
    results: list[Optional[dict]] = [None] * len(targets)
    for (cache, layer, sublayer, _, _), idx in groups.items():
        members = [targets[i] for i in idx]
        for i, r in zip(idx, _evaluate_group(members, cache, layer, sublayer, cfg)):
            results[i] = r
    return results


@torch.no_grad()
def _evaluate_group(members: list[EvalTarget], cache: str, layer: int, sublayer: str, cfg) -> list[dict]:
    source = open_site(cache, layer, sublayer)
    for t in members:
        if t.sae.d_in != source.width:
            raise EvalInputError(f"width mismatch: SAE {t.name} reads {t.sae.d_in}-dimensional activations "
                                 f"but the cache's {source.name} is {source.width} wide")
    seqs = select_heldout(source, members[0].heldout, cfg.max_tokens)
    accs = [ReconstructionAccumulator(t.sae.d_sae, source.context_length, cfg.dense_threshold) for t in members]
    bench_accs = [SAEBenchAccumulator(t.sae.d_sae, cfg.saebench_group_sequences) for t in members]
    ignored = ignored_token_ids(_cache_attrs(cache), source.bos_token_id)
    device = torch.device(cfg.device)
    n_lm = min(int(cfg.delta_lm_sequences), len(seqs))
    lm_tokens = []
    bar = tqdm(total=len(seqs), desc=f"held-out {source.name} ({len(members)} SAE{'s' * (len(members) > 1)})",
               unit="seq", disable=not cfg.progress)
    for tokens, acts in heldout_batches(source, seqs, cfg.batch_sequences):
        keep = non_bos_mask(tokens, source.bos_token_id).to(device)
        counted = counted_tokens(tokens, ignored).to(device)
        acts = acts.to(device)
        flat = acts.reshape(-1, acts.shape[-1])
        for t, acc, bench in zip(members, accs, bench_accs):
            f = t.sae.encode(flat)
            x_hat = t.sae.decode(f)
            acc.update_encoded(acts, f, x_hat, keep)
            bench.update(acts, f, x_hat, counted)
            del f, x_hat
        if sum(len(x) for x in lm_tokens) < n_lm:
            lm_tokens.append(tokens)
        bar.update(len(tokens))
    bar.close()

    results = [{"reconstruction": acc.result(),
                "heldout": {**t.heldout, "n_sequences_evaluated": len(seqs), "context_length": source.context_length}}
               for t, acc in zip(members, accs)]
    results = _delta_lm(results, members, accs, lm_tokens, n_lm, cache, layer, sublayer, source, cfg)
    for r, bench in zip(results, bench_accs):
        r["saebench"] = saebench_metrics(bench.result(), r["delta_lm"])
    return results


def _delta_lm(results, members, accs, lm_tokens, n_lm, cache, layer, sublayer, source, cfg) -> list[dict]:
    if n_lm == 0:
        for r in results:
            r["delta_lm"] = {"skipped": "delta_lm_sequences=0"}
        return results
    model, reason = _load_model(cache, cfg.device)
    if model is None:
        warnings.warn(reason)
        for r in results:
            r["delta_lm"] = {"skipped": reason}
        return results
    tokens = torch.cat(lm_tokens)[:n_lm]
    # Mean-ablation fills the site with its mean over the held-out non-BOS rows just read.
    mean_activation = (accs[0].sum_x / accs[0].n).float()
    lm = delta_lm_losses(model, tokens, layer, sublayer, [t.sae for t in members], source.bos_token_id,
                         batch_sequences=cfg.delta_lm_batch_sequences, progress=cfg.progress,
                         mean_activation=mean_activation)
    for r, result in zip(results, lm):
        r["delta_lm"] = result.to_dict()
    return results

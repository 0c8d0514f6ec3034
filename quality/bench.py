"""`make quality` / `python -m quality`: our trainer against SAELens on the same data, side by side.

For every cache (synthetic regimes with known features, and harvested LM caches) and every budget:
each arm (a recipe with a sweep of its sparsity knob) is trained on the same rows in the same order
(our loader, at each seed) for the same number of tokens; every SAE is then scored on the same held-out
sequences: L0, FVU, dead and alive latents, recovery of the true features (synthetic), delta LM loss
(LM caches). Outputs under `out/`: results.json (a run per cache, budget and seed), report.md (tables,
comparisons at equal L0 of the means over seeds) and a frontier plot per cache and budget.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from train.members import preset_files

from .config import QualityConfig
from .report import PER_SEQUENCE
from .ours_arm import member_name, train_ours
from .saelens_arm import available as saelens_available, train_saelens, version as saelens_version
from .synthetic import LAYER, SUBLAYER, true_features, write_synthetic_cache


# Settings an LM cache may set for itself (LMCache); a cache that does is scored and keyed with its own.
CACHE_SETTINGS = ("heldout_fraction", "delta_lm_sequences")


def _caches(cfg: QualityConfig) -> list[dict]:
    out = []
    for regime in cfg.regimes:
        if cfg.only_regimes and regime.name not in cfg.only_regimes:
            continue
        path = Path(cfg.caches) / regime.name
        if not cfg.report_only:                  # a report from kept results reads no cache
            write_synthetic_cache(path, regime, cfg.synthetic_tokens, progress=cfg.progress)
        out.append({"name": regime.name, "cache": str(path), "layer": LAYER, "sublayer": SUBLAYER,
                    "features": True, "regime": asdict(regime)})
    for lm in cfg.lm_caches:
        if cfg.only_regimes and lm.name not in cfg.only_regimes:
            continue
        out.append({"name": lm.name, "cache": lm.cache, "layer": lm.layer, "sublayer": lm.sublayer,
                    "features": None, **{k: getattr(lm, k) for k in CACHE_SETTINGS if getattr(lm, k) is not None}})
    return out


def _setting(cache: dict, cfg: QualityConfig, name: str):
    return cache.get(name, getattr(cfg, name))


def _loader_batches(cache: dict, cfg: QualityConfig, batch_size: int, seed: int = 0):
    """The batches our trainer sees at `seed`, in its order, as float32 raw activations (what SAELens gets)."""
    from train.cache_reader import heldout_sequences, open_activations
    from train.loader import ChunkLoader
    source = open_activations(cache["cache"], cache["layer"], cache["sublayer"])
    held = heldout_sequences(source.n_sequences, _setting(cache, cfg, "heldout_fraction"), 0)
    loader = ChunkLoader(source, np.flatnonzero(source.complete), held, batch_size, cfg.buffer_tokens,
                         seed, device=cfg.device)

    def batches():
        while True:
            yield loader.next_batch().to(torch.float32).clone()
    return source, batches()


def _targets(cache: dict, budget, cfg: QualityConfig, run_dir: Path, arms, seed: int = 0) -> list:
    """Train `arms` at `budget` and `seed`; one EvalTarget per SAE."""
    from evaluate.sources import EvalTarget
    from train.run_folder import load_sae
    ours = [a for a in arms if a.trainer == "ours"]
    peers = [a for a in arms if a.trainer == "saelens"]
    heldout = {"fraction": _setting(cache, cfg, "heldout_fraction"), "seed": 0}
    targets = []
    if ours:
        trained = ",".join(f"{a.name}@{a.levels}" for a in ours)
        sweep = run_dir / ("ours-" + hashlib.sha256(trained.encode()).hexdigest()[:8])
        shutil.rmtree(sweep, ignore_errors=True)
        done = train_ours(ours, cache["cache"], cache["layer"], cache["sublayer"], sweep, budget, cfg,
                          heldout["fraction"], seed)
        for arm in ours:
            for level in arm.levels:
                name = member_name(arm.name, level)
                sae, meta = load_sae(done["folders"][name])
                meta = {**meta, "label": arm.name, "trainer": "ours", "level": level,
                        "ms_per_step": done["ms_per_member_step"]}
                targets.append(EvalTarget(name=name, path=done["folders"][name], sae=sae, meta=meta,
                                          layer=cache["layer"], sublayer=cache["sublayer"], cache=cache["cache"],
                                          heldout=heldout))
    if peers and not saelens_available():
        print("[quality] sae-lens is not installed (pip install -e '.[saelens]'): its arms are skipped")
        peers = []
    steps = int(budget.tokens) // budget.batch_size
    for arm in peers:
        for level in arm.levels:
            source, batches = _loader_batches(cache, cfg, budget.batch_size, seed)
            d_sae = cfg.width or cfg.expansion * source.width
            sae, timing = train_saelens(arm.preset, arm.knob, level, dict(arm.overrides), batches, source.width, d_sae,
                                        steps, budget.batch_size, budget.lr, budget.lr_warmup_steps,
                                        max(1, int(budget.sparsity_warmup_fraction * steps)), cfg.device, seed,
                                        same_batches=lambda: _loader_batches(cache, cfg, budget.batch_size, seed)[1])
            name = member_name(arm.name, level)
            meta = {"architecture": arm.preset, "label": arm.name, "trainer": "saelens", "level": level,
                    "ms_per_step": timing["ms_per_step"], "saelens_version": saelens_version()}
            targets.append(EvalTarget(name=name, path=run_dir / "saelens" / name, sae=sae, meta=meta,
                                      layer=cache["layer"], sublayer=cache["sublayer"], cache=cache["cache"],
                                      heldout=heldout))
    return targets


def preset_settings(group: str, name: str) -> dict:
    """What conf/<group>/<name>.yaml sets, on what the presets it extends set
    (train.members.preset_files): a value that changes retrains its arms, a comment does not, nor a
    value changed in an extended preset that this one sets for itself."""
    return effective_settings([OmegaConf.to_container(OmegaConf.load(p)) for p in preset_files(group, name)])


def effective_settings(files: list) -> dict:
    """One preset's settings from its files' (parsed, the extended ones first): each file's values
    over the ones before, without their defaults lists. Results kept before 2026-12-07 hold the list."""
    merged = {}
    for settings in files:
        merged.update({k: v for k, v in settings.items() if k != "defaults"})
    return merged


def _arm_identity(arm, budget, cache: dict, cfg: QualityConfig, seed: int = 0) -> dict:
    """What an arm's results depend on (for our arms, the preset's settings too, conf/sae/ and
    conf/optim/: a preset edited in place retrains): if all of it matches, earlier results are reused."""
    preset = {}
    if arm.trainer == "ours":                    # with the presets they extend
        preset["preset"] = preset_settings("sae", arm.preset)
        optim = preset_settings("optim", arm.preset)
        if optim:                                # only where there is one: other arms keep their identity
            preset["optim_preset"] = optim
    where = ("caches",)                          # where it runs, not what it gives there
    # An LM cache's scores hold each SAE's delta LM loss per held-out sequence (for the paired comparison)
    # since 2026-12-07: results kept from before, without them, are scored again.
    scores = {"lm_scores": "per_sequence"} if cache.get("features") is None else {}
    return {"arm": _without(asdict(arm), where), **preset, **scores, "budget": _without(asdict(budget), where),
            "cache": {k: cache[k] for k in ("cache", "layer", "sublayer", *CACHE_SETTINGS) if k in cache},
            "regime": cache.get("regime"),
            "settings": {**{k: getattr(cfg, k) for k in ("width", "expansion", "buffer_tokens", "heldout_fraction",
                                                         "eval_tokens", "delta_lm_sequences", "match_threshold")},
                         "seed": seed, "device": cfg.device}}


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _arm_file(run_dir: Path, arm) -> Path:
    return run_dir / "arms" / f"{arm.name}.json"


def _but_levels(identity: dict | None):
    if identity is None:
        return None
    presets = {k: effective_settings(identity[k]) for k in ("preset", "optim_preset")
               if isinstance(identity.get(k), list)}
    return {**identity, **presets, "arm": {k: v for k, v in identity["arm"].items() if k != "levels"}}


def _cached_rows(run_dir: Path, arm, identity: dict, kept_run: dict | None) -> list:
    """The arm's rows from an earlier run with the same identity but for its levels, at the levels it
    still has: out/'s own, else the kept results' ([] where there are none). Each level is an SAE of
    its own (a lock-step sweep trains each member as alone), so a level added trains only that level."""
    identity = _but_levels(json.loads(json.dumps(identity)))
    found = []
    path = _arm_file(run_dir, arm)
    if path.is_file():
        saved = json.loads(path.read_text())
        if _but_levels(saved.get("identity")) == identity:
            found = saved["rows"]
    if not found and kept_run and _but_levels(kept_run.get("identities", {}).get(arm.name)) == identity:
        found = [r for r in kept_run["rows"] if r["arm"] == arm.name]
    return sorted((r for r in found if r["level"] in arm.levels), key=lambda r: arm.levels.index(r["level"]))


def _kept_runs(cfg: QualityConfig) -> dict:
    """{(cache name, budget name, seed): run} of cfg.kept's results.json ({} without one)."""
    from .report import seed_runs
    path = Path(cfg.kept) if cfg.kept else None
    if path is None or not path.is_file():
        return {}
    return seed_runs(path)


def arm_seeds(cfg: QualityConfig, cache: str, arm) -> list[int]:
    """The seeds `arm` is trained at on `cache`: none where the arm names other caches, else the
    benchmark's, and cfg.repeat's where it names both."""
    if arm.caches and cache not in arm.caches:
        return []
    more = cfg.repeat.seeds if cache in cfg.repeat.caches and arm.name in cfg.repeat.arms else []
    return sorted(set(cfg.seeds) | set(more))


def _check_names(cfg: QualityConfig) -> None:
    """Every cache and arm a setting names is one of the benchmark's (a misspelt name would silently
    train nothing), no arm name is given twice, and there is a seed."""
    if not cfg.seeds:
        raise ValueError("seeds: at least one")
    arms = [a.name for a in cfg.arms]
    twice = sorted({n for n in arms if arms.count(n) > 1})
    if twice:
        raise ValueError(f"arms: {twice} named more than once (an arm's results are kept by its name)")
    caches = [r.name for r in cfg.regimes] + [c.name for c in cfg.lm_caches]
    named = [("repeat.caches", cfg.repeat.caches, caches), ("repeat.arms", cfg.repeat.arms, arms)]
    named += [(f"budgets[{b.name}].caches", b.caches, caches) for b in cfg.budgets]
    named += [(f"arms[{a.name}].caches", a.caches, caches) for a in cfg.arms]
    for where, names, known in named:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"{where}: {unknown} not among the benchmark's ({', '.join(known)})")


def _score(targets: list, cache: dict, cfg: QualityConfig) -> list[dict]:
    from evaluate.config import EvalConfig
    from evaluate.evaluation import evaluate_targets
    from evaluate.features import feature_recovery
    eval_cfg = EvalConfig(run="", max_tokens=cfg.eval_tokens, progress=cfg.progress, plots=False,
                          delta_lm_sequences=_setting(cache, cfg, "delta_lm_sequences") if cache["features"] is None else 0,
                          device=cfg.device)
    results = evaluate_targets(targets, eval_cfg)
    features = true_features(cache["cache"]) if cache["features"] else None
    rows = []
    for t, r in zip(targets, results):
        rec = r["reconstruction"]
        freq = np.asarray(rec.firing_frequency)
        row = {"name": t.name, "arm": t.meta["label"], "trainer": t.meta["trainer"], "level": t.meta["level"],
               "l0": rec.l0, "fvu": rec.fvu, "dead_fraction": rec.dead_fraction, "alive": int((freq > 0).sum()),
               "dense_fraction": rec.dense_fraction, "ms_per_step": t.meta["ms_per_step"],
               "folder": str(t.path) if t.meta["trainer"] == "ours" else None}
        if "saelens_version" in t.meta:         # recorded, not in the identity (pyproject pins it)
            row["saelens_version"] = t.meta["saelens_version"]
        if features is not None:
            got = feature_recovery(t.sae.W_dec, features, cfg.match_threshold)
            row["mmcs"], row["recovered"] = got["mean_max_cosine"], got["recovered_fraction"]
        lm = r.get("delta_lm", {})
        for k in ("delta_ce", "delta_ce_se", "fraction_recovered", "fraction_recovered_mean", "kl_spliced",
                  "kl_spliced_se"):
            if isinstance(lm.get(k), float):
                row[k] = lm[k]
        for key in PER_SEQUENCE.values():                # for paired comparisons (quality/report.py)
            if lm.get(key):
                row[key] = [float(f"{v:.6g}") for v in lm[key]]
        rows.append(row)
    return rows


def run_quality(cfg: QualityConfig) -> dict:
    """Train and score every arm of every cache and budget at each of its seeds; the levels of an arm
    whose results for the same identity (its settings, the budget, the cache, the seed, the scoring)
    are already in out/ or in the kept results are not retrained, so an interrupted benchmark resumes,
    `only_arms` runs add to the same report, and a level added to an arm trains that level alone."""
    from .report import write_report
    _check_names(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    results = {"config": asdict(cfg), "runs": []}
    kept = _kept_runs(cfg)
    for cache in _caches(cfg):
        for budget in cfg.budgets:
            if (cfg.only_budgets and budget.name not in cfg.only_budgets) or (budget.caches and
                                                                              cache["name"] not in budget.caches):
                continue
            seeds = {a.name: arm_seeds(cfg, cache["name"], a) for a in cfg.arms}
            for seed in sorted(set().union(*seeds.values())):
                run = _run_seed(cfg, cache, budget, seed, [a for a in cfg.arms if seed in seeds[a.name]],
                                kept.get((cache["name"], budget.name, seed)))
                if run is not None:
                    results["runs"].append(run)
                    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = write_report(results, out)
    print(f"[quality] wrote {report} and {out / 'results.json'}")
    return results


def _run_seed(cfg: QualityConfig, cache: dict, budget, seed: int, arms: list, kept_run: dict | None) -> dict | None:
    """One cache, budget and seed: the arms' rows, trained where neither out/ nor the kept results have
    them; None where no arm has any."""
    run_dir = Path(cfg.out) / "runs" / cache["name"] / budget.name / f"seed_{seed}"
    identities = {a.name: _arm_identity(a, budget, cache, cfg, seed) for a in arms}
    cached = {a.name: _cached_rows(run_dir, a, identities[a.name], kept_run) for a in arms}
    missing = {a.name: [v for v in a.levels if v not in {r["level"] for r in cached[a.name]}] for a in arms}
    todo = [replace(a, levels=missing[a.name]) for a in arms if missing[a.name] and not cfg.report_only
            and (not cfg.only_arms or a.name in cfg.only_arms)]
    if todo:
        print(f"[quality] {cache['name']} / {budget.name} / seed {seed}: training "
              + ", ".join(f"{a.name}@{','.join(f'{v:g}' for v in a.levels)}" for a in todo), flush=True)
        rows = _score(_targets(cache, budget, cfg, run_dir, todo, seed), cache, cfg)
        by_name = {a.name: a for a in arms}
        for arm in (by_name[t.name] for t in todo):
            new = {r["level"]: r for r in cached[arm.name] + [r for r in rows if r["arm"] == arm.name]}
            cached[arm.name] = [new[v] for v in arm.levels if v in new]
            path = _arm_file(run_dir, arm)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"identity": identities[arm.name], "rows": cached[arm.name]}, indent=1) + "\n")
    rows = [r for a in arms if cached[a.name] for r in cached[a.name]]
    if not rows:
        return None
    return {"cache": cache, "budget": asdict(budget), "seed": seed, "rows": rows,
            "identities": {a.name: identities[a.name] for a in arms if cached[a.name]}}

"""Our recipes, trained by our trainer: every `ours` arm and level of one budget is a member of ONE
lock-step sweep (`train.sweep`), so they read the cache once, in the loader's order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _value(v) -> str:
    """A value as a Hydra override (strings quoted: member names contain '=')."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("'", "\\'") + "'"
    return repr(v)


def member_name(arm: str, level) -> str:
    return f"{arm}@{level:g}"


def sweep_members(arms) -> list[dict]:
    members = []
    for arm in arms:
        for level in arm.levels:
            sections = {"sae": {}, "optim": {}, "train": {}}
            for key, value in arm.overrides.items():
                section, _, field = key.partition(".")
                if section not in sections or not field:
                    raise ValueError(f"arm {arm.name}: override {key!r} must be sae.<field>, optim.<field> or "
                                     "train.<field> (a member's own)")
                sections[section][field] = value
            sections["sae"][arm.knob] = int(level) if arm.knob == "k" else float(level)
            member = {"preset": arm.preset, "name": member_name(arm.name, level)}
            member.update({k: v for k, v in sections.items() if v or k == "sae"})
            members.append(member)
    return members


def train_ours(arms, cache: str, layer: int, sublayer: str, run_dir: Path, budget, cfg,
               heldout_fraction: float | None = None, seed: int = 0) -> dict:
    """Train the arms at this budget and seed (the loader's and the initialisation's) with
    `python -m train.sweep`; {member name: run folder}, and the
    median milliseconds per member step (the sweep's tokens/s over its logging intervals, shared by
    its members in lock-step)."""
    steps = int(budget.tokens) // budget.batch_size
    members = sweep_members(arms)
    heldout_fraction = cfg.heldout_fraction if heldout_fraction is None else heldout_fraction
    cmd = [sys.executable, "-m", "train.sweep",
           f"cache={_value(str(cache))}", f"layer={layer}", f"sublayer={sublayer}", f"run_dir={_value(str(run_dir))}",
           "sweep=none", f"sweep.members={_value(members)}",
           f"train.total_tokens={int(budget.tokens)}", f"loader.batch_size={budget.batch_size}",
           f"loader.buffer_tokens={cfg.buffer_tokens}", f"loader.heldout_fraction={heldout_fraction}",
           f"loader.seed={seed}", f"train.seed={seed}", f"optim.lr={budget.lr}",
           f"optim.lr_warmup_steps={budget.lr_warmup_steps}",
           f"optim.lambda_warmup_steps={max(1, int(budget.sparsity_warmup_fraction * steps))}",
           f"sae.width={cfg.width}", f"sae.expansion={cfg.expansion}", "train.checkpoint_every_steps=0",
           "train.tensorboard=false", f"train.progress={str(cfg.progress).lower()}",
           f"train.log_every_steps={max(1, steps // 20)}", f"train.device={cfg.device}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    done = subprocess.run(cmd, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"our sweep failed (exit {done.returncode}): {' '.join(cmd[1:])}")
    folders = {m["name"]: Path(run_dir) / m["name"] for m in members}
    first = next(iter(folders.values())) / "metrics.jsonl"
    rates = [json.loads(line).get("tokens_per_s") for line in first.read_text().splitlines()]
    rates = [r for r in rates if r]
    ms = 1000 * budget.batch_size / float(np.median(rates)) / len(members) if rates else float("nan")
    return {"folders": folders, "ms_per_member_step": ms}

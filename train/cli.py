"""What `python -m train` and `python -m train.sweep` do once Hydra has composed the config."""
from __future__ import annotations

import sys
from pathlib import Path


from hydra.experimental.callback import Callback

from .cache_reader import SUBLAYERS, CacheError
from .loop import MemberSpec, TrainingDiverged, train_members
from .members import member_configs
from .run_folder import ForeignRunFolder, check_run_folder


def run_training(cfg, single: bool):
    import kernels
    kernels.require_ours()
    if cfg.kernel_backend not in kernels.BACKENDS:
        raise ValueError(f"kernel_backend={cfg.kernel_backend!r}; choose one of {', '.join(kernels.BACKENDS)}")
    if cfg.sublayer not in SUBLAYERS:
        raise ValueError(f"sublayer={cfg.sublayer!r}; choose one of {', '.join(SUBLAYERS)}")
    members = member_configs(cfg)
    run_dir = Path(cfg.run_dir)
    check_run_folder(run_dir)
    if single and len(members) != 1:
        raise ValueError("`python -m train` trains one SAE; use `python -m train.sweep` for a grid")
    shard, n_shards = cfg.sweep.shard, cfg.sweep.num_shards
    if not 0 <= shard < n_shards:
        raise ValueError(f"sweep.shard={shard} must be in [0, sweep.num_shards={n_shards})")
    mine = [(i, name, m) for i, (name, m) in enumerate(members) if i % n_shards == shard]
    if not mine:
        print(f"[sweep] shard {shard} of {n_shards} has no member")
        return None
    if single:
        folder = run_dir
        if _hydra_job_num() is not None:    # `python -m train hydra.mode=MULTIRUN a=1,2`: a folder per job
            folder = run_dir / f"job_{_hydra_job_num()}"
        specs = [MemberSpec(members[0][0], folder, members[0][1])]
        ckpt = folder / "checkpoint.pt"
    else:
        specs = [MemberSpec(name, run_dir / name, m) for _, name, m in mine]
        ckpt = run_dir / ("checkpoint.pt" if n_shards == 1 else f"checkpoint_shard{shard}of{n_shards}.pt")
        print(f"[sweep] {len(specs)} members in lock-step: " + ", ".join(s.name for s in specs))
    final = train_members(cfg, specs, ckpt)
    if final is not None:
        for name, metrics in final.items():
            shown = {k: metrics[k] for k in ("fvu", "mse", "l0", "dead", "dense", "loss") if k in metrics}
            print(f"[train] {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in shown.items()))
        if single:
            print(f"[train] wrote {specs[0].folder / 'sae.safetensors'} and {specs[0].folder / 'sae.json'}")
        else:
            print(f"[sweep] wrote {len(specs)} run folders under {run_dir}")
    return final


def main_entry(cfg, single: bool):
    """run_training for the command line: bad input ends the process with its message, no traceback."""
    try:
        return run_training(cfg, single)
    except (CacheError, TrainingDiverged, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


class RefuseForeignRunFolder(Callback):
    """conf/train.yaml's hydra.callbacks: checks run_dir before Hydra writes .hydra/ (and its log) into it."""

    def _check(self, config) -> None:
        try:
            check_run_folder(config.run_dir)
        except ForeignRunFolder as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config)


def _hydra_job_num():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().job.num

"""The members of a sweep: `sweep.grid` (a nested dict of lists: their product) crossed with
`sweep.members` (a list of override dicts of sae.*, optim.* and the member's own train.* fields; `preset: <name>` starts from conf/sae/<name>.yaml and
conf/optim/<name>.yaml where there is one, as `sae=<name>` would, keeping the command line's sae.* and
optim.* overrides, and `name:` names the member). A single run is a sweep of one member: the base config."""
from __future__ import annotations

import itertools
from pathlib import Path

from omegaconf import OmegaConf

from .member import CONSTANTS_UNITS
from .sae import TANH_SCALE_UNITS

CONF = Path(__file__).resolve().parent.parent / "conf"


# The train.* fields a member may set for itself: its own latent bookkeeping (the dead latents of the
# pre-activation loss among them). The rest of train.* is the sweep's, shared in lock-step.
MEMBER_TRAIN_FIELDS = ("dead_window_tokens", "dense_fraction")


def _leaves(tree, prefix=()):
    """{sae: {sparsity_coeff: [..]}} -> [(("sae", "sparsity_coeff"), [..])]"""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _leaves(v, prefix + (k,))
        else:
            if not isinstance(v, list):
                raise ValueError(f"sweep.grid.{'.'.join(prefix + (k,))} must be a list of values, got {v!r}")
            out.append((prefix + (k,), v))
    return out


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def preset_files(group: str, name: str) -> list[Path]:
    """conf/<group>/<name>.yaml and the presets of the same group it extends through its defaults
    list (as Hydra reads it), the ones it extends first; [] where there is no such file."""
    path = CONF / group / f"{name}.yaml"
    if not path.exists():
        return []
    files = []
    for entry in OmegaConf.load(path).get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            files += preset_files(group, entry)        # the schema (sae_schema) is no file: skipped
    return files + [path]


def _preset(group: str, schema, name: str):
    cfg = OmegaConf.structured(schema)
    for path in preset_files(group, name):
        preset_cfg = OmegaConf.load(path)
        preset_cfg.pop("defaults", None)
        cfg = OmegaConf.merge(cfg, preset_cfg)
    return cfg


def sae_preset(name: str):
    """conf/sae/<name>.yaml on the schema's defaults: what `sae=<name>` gives."""
    from .config import SAEConfig
    path = CONF / "sae" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"sweep preset {name!r}: no {path}")
    return _preset("sae", SAEConfig, name)


def optim_preset(name: str):
    """conf/optim/<name>.yaml, the optimizer settings a recipe needs, on the schema's defaults: what
    `sae=<name>` gives the optim section (conf/train.yaml: `optional optim: ${sae}`); the schema's
    alone where the preset has none."""
    from .config import OptimConfig
    return _preset("optim", OptimConfig, name)


def _base_preset_name(sae) -> str:
    """The sae preset the base config was composed from: Hydra's choice when running under Hydra,
    else (a config composed elsewhere) the preset that differs from it in the fewest fields."""
    try:
        from hydra.core.hydra_config import HydraConfig
        choice = HydraConfig.get().runtime.choices.get("sae")
        if choice:
            return choice
    except (ValueError, ImportError):
        pass
    def distance(name):
        preset = sae_preset(name)
        return sum(preset.get(k) != v for k, v in sae.items())
    return min(sorted(p.stem for p in (CONF / "sae").glob("*.yaml")), key=distance)


def base_overrides(cfg) -> dict:
    """{"sae": .., "optim": ..}: the base config's fields that differ from its preset's (conf/sae/<name>.yaml,
    conf/optim/<name>.yaml): the command line's overrides, which every member keeps. A member's preset
    replaces the rest (a preset's unset fields take the schema's defaults, never the base preset's)."""
    name = _base_preset_name(cfg.sae)
    out = {}
    for section, preset in (("sae", sae_preset(name)), ("optim", optim_preset(name))):
        out[section] = {k: v for k, v in OmegaConf.to_container(cfg[section]).items() if preset.get(k) != v}
    return out


def member_configs(cfg) -> list[tuple[str, object]]:
    """[(name, member cfg with sections sae, optim, train)] for every member of the sweep, in order."""
    grid = _leaves(OmegaConf.to_container(cfg.sweep.grid))
    for path, _ in grid:
        if path[0] not in ("sae", "optim") or len(path) != 2:
            raise ValueError(f"sweep.grid.{'.'.join(path)}: grid keys are sae.<field> or optim.<field>")
    explicit = OmegaConf.to_container(cfg.sweep.members) or [{}]
    base = OmegaConf.masked_copy(cfg, ["sae", "optim", "train"])
    cli = base_overrides(cfg) if any("preset" in e for e in explicit) else {}
    members = []
    for over in explicit:
        over = dict(over)
        preset = over.pop("preset", None)
        unknown = set(over) - {"sae", "optim", "train", "name"}
        if unknown:
            raise ValueError(f"sweep.members entry {over}: unknown keys {sorted(unknown)} (use preset, sae, optim, "
                             "train, name)")
        not_own = set(over.get("train", {})) - set(MEMBER_TRAIN_FIELDS)
        if not_own:
            raise ValueError(f"sweep.members entry {over}: train.{sorted(not_own)[0]} is the sweep's, shared by "
                             f"its members in lock-step; a member sets only train.{' and train.'.join(MEMBER_TRAIN_FIELDS)}")
        if preset is not None:
            preset_sae = OmegaConf.merge(sae_preset(preset), cli["sae"])
            preset_optim = OmegaConf.merge(optim_preset(preset), cli["optim"])
        for values in itertools.product(*[v for _, v in grid]):
            m = base.copy()
            if preset is not None:
                m.sae, m.optim = preset_sae.copy(), preset_optim.copy()
            m = OmegaConf.merge(m, {k: v for k, v in over.items() if k != "name"})
            parts = [over["name"]] if "name" in over else ([preset] if preset else [])
            for (section, key), value in zip([p for p, _ in grid], values):
                OmegaConf.update(m, f"{section}.{key}", value, merge=False)
                parts.append(f"{key}={_label(value)}")
            if not parts:
                parts = [m.sae.architecture]
            members.append(("_".join(parts), m))
    for name, m in members:
        check_member(name, m)
    names = [n for n, _ in members]
    if len(set(names)) != len(names):
        members = [(f"{i:02d}_{n}", m) for i, (n, m) in enumerate(members)]
    return members


CHOICES = {"architecture": ("jumprelu", "relu", "topk", "batchtopk", "gated"),
           "sparsity_loss": ("l0", "quadratic", "l1", "tanh"), "theta_parametrisation": ("raw", "log"),
           "b_dec_init": ("zeros", "mean"),
           "threshold_grad_pool": ("none", "window", "ema"), "constants_unit": CONSTANTS_UNITS,
           "tanh_scale_unit": TANH_SCALE_UNITS}


def check_member(name: str, m) -> None:
    """Values the schema types cannot check (string choices, ranges), before any work."""
    for key, allowed in CHOICES.items():
        if m.sae[key] not in allowed:
            raise ValueError(f"member {name!r}: sae.{key}={m.sae[key]!r}; choose one of {', '.join(allowed)}")
    if m.sae.width < 0 or m.sae.expansion < 1 or m.sae.k < 1 or m.sae.aux_k < 0:
        raise ValueError(f"member {name!r}: sae.width >= 0, sae.expansion >= 1, sae.k >= 1 and sae.aux_k >= 0 "
                         "are required")
    if min(m.optim.lr, m.optim.bias_lr_scale, m.sae.bandwidth, m.sae.theta_init) <= 0:
        raise ValueError(f"member {name!r}: optim.lr, optim.bias_lr_scale, sae.bandwidth and sae.theta_init must be "
                         "positive")
    if not 0 <= m.sae.theta_init_quantile < 1 or m.optim.grad_clip_norm < 0 or min(m.sae.threshold_lr, m.sae.threshold_travel) < 0:
        raise ValueError(f"member {name!r}: sae.theta_init_quantile in [0, 1), optim.grad_clip_norm >= 0 and "
                         "sae.threshold_lr, sae.threshold_travel >= 0 are required")
    if not 0 <= m.sae.pre_act_until_fraction <= 1:
        raise ValueError(f"member {name!r}: sae.pre_act_until_fraction={m.sae.pre_act_until_fraction!r}, in [0, 1] "
                         "is required")
    o = m.optim
    if o.resample_every_steps < 0 or not 0 <= o.resample_until_fraction <= 1 or not o.resample_encoder_scale > 0:
        raise ValueError(f"member {name!r}: optim.resample_every_steps >= 0, optim.resample_until_fraction in [0, 1] "
                         "and optim.resample_encoder_scale > 0 are required")
    if m.sae.architecture == "jumprelu" and m.sae.sparsity_loss == "quadratic" and m.sae.target_l0 <= 0:
        raise ValueError(f"member {name!r}: sae.sparsity_loss=quadratic needs sae.target_l0 > 0")

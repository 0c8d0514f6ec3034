"""What `run=` points at, resolved into SAEs to evaluate: a run folder (sae.json + sae.safetensors), a
sweep folder (one run folder per member), a Gemma Scope params.npz (a released SAE, or our export
of one, which sits beside a provenance.json naming its site and cache), or a SAELens folder
(cfg.json + sae_weights.safetensors: SAELens's own, or our export, which records its cache)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import EvalInputError
from .gemmascope import load_params_npz
from .labels import architecture_label
from .saelens import CFG_FILE as SAELENS_CFG, HOOK_NAMES, WEIGHTS_FILE as SAELENS_WEIGHTS

PARAMS_FILE = "params.npz"
PROVENANCE_FILE = "provenance.json"     # written beside an exported params.npz


class RunError(EvalInputError):
    """`run=` does not point at something evaluable; the message says what is missing."""


@dataclass
class EvalTarget:
    name: str
    path: Path
    sae: torch.nn.Module
    meta: dict
    layer: int
    sublayer: str
    cache: str
    heldout: dict                  # {"fraction", "seed"}: the trainer's held-out rule
    metrics_file: Optional[Path] = None
    notes: list = field(default_factory=list)


def default_heldout() -> dict:
    from train.config import LoaderConfig
    d = LoaderConfig()
    return {"fraction": d.heldout_fraction, "seed": d.heldout_seed}


def _is_run_folder(p: Path) -> bool:
    return (p / "sae.json").is_file()


def _site(meta: dict, cfg, where: str) -> tuple[int, str, str]:
    """(layer, sublayer, cache): the config's values where given, else those recorded in `meta`;
    a disagreement between the two is an error rather than a silent choice."""
    values = {}
    for key in ("layer", "sublayer", "cache"):
        given, recorded = getattr(cfg, key), meta.get(key)
        if given is not None and recorded is not None and key != "cache" and str(given) != str(recorded):
            raise RunError(f"{where} was trained on {key}={recorded!r} but {key}={given!r} was asked for")
        values[key] = given if given is not None else recorded
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise RunError(f"{where} records no {', '.join(missing)}: pass {' '.join(k + '=...' for k in missing)}")
    return int(values["layer"]), str(values["sublayer"]), str(values["cache"])


def load_run_folder(path: Path, cfg, device: str = "cpu") -> EvalTarget:
    from train.run_folder import load_sae
    meta_file, weights = path / "sae.json", path / "sae.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        missing = [f.name for f in (meta_file, weights) if not f.is_file()]
        raise RunError(f"run folder {str(path)!r} has no final SAE: {' and '.join(missing)} missing "
                       f"(training unfinished or interrupted? it holds: {', '.join(present) or 'nothing'})")
    sae, meta = load_sae(path, device=device)
    layer, sublayer, cache = _site(meta, cfg, f"run {str(path)!r}")
    metrics = path / "metrics.jsonl"
    return EvalTarget(name=path.name, path=path, sae=sae, meta=meta, layer=layer, sublayer=sublayer,
                      cache=cache, heldout=dict(meta.get("heldout") or default_heldout()),
                      metrics_file=metrics if metrics.is_file() else None)


def load_params(path: Path, cfg, device: str = "cpu") -> EvalTarget:
    sae = load_params_npz(path).to(device).eval()
    provenance_file = path.parent / PROVENANCE_FILE
    meta = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    # Our export keeps its architecture label (a ReLU SAE is a JumpReLU at threshold 0); a file
    # without provenance is a release, labelled apart from what we trained.
    label = architecture_label(meta) if meta.get("architecture") else "gemma-scope"
    meta = {**meta, "architecture": "jumprelu", "label": label, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "source": "params.npz"}
    layer, sublayer, cache = _site(meta, cfg, f"params file {str(path)!r}")
    # A released SAE never saw our cache; the trainer's default held-out rule puts it on the same
    # sequences as the SAEs we train, so the two can be compared side by side.
    heldout = dict(meta.get("heldout") or default_heldout())
    if cfg.heldout_fraction is not None:
        heldout["fraction"] = float(cfg.heldout_fraction)
    if cfg.heldout_seed is not None:
        heldout["seed"] = int(cfg.heldout_seed)
    name = path.parent.name if path.name == PARAMS_FILE else path.stem
    return EvalTarget(name=name, path=path, sae=sae, meta=meta, layer=layer, sublayer=sublayer, cache=cache,
                      heldout=heldout)


def _is_saelens_folder(p: Path) -> bool:
    return (p / SAELENS_CFG).is_file() and (p / SAELENS_WEIGHTS).is_file()


def _site_of_hook(hook: Optional[str]) -> tuple[Optional[int], Optional[str]]:
    """(layer, sublayer) of a TransformerLens hook name such as blocks.12.hook_mlp_out."""
    for sublayer, pattern in HOOK_NAMES.items():
        m = re.fullmatch(re.escape(pattern).replace(re.escape("{layer}"), r"(\d+)"), hook or "")
        if m:
            return int(m.group(1)), sublayer
    return None, None


def _saelens_sae(cfg: dict, tensors: dict, where: str) -> torch.nn.Module:
    """Our module computing what SAELens computes for this folder, on raw inputs: SAELens's
    apply_b_dec_to_input (x - b_dec before the encoder) is folded into the encoder bias."""
    from train.sae import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE
    arch = cfg.get("architecture", "standard")
    if arch not in ("jumprelu", "standard", "topk", "gated"):
        raise RunError(f"{where}: SAELens architecture {arch!r} has no equivalent here "
                       "(jumprelu, standard, topk and gated are read)")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise RunError(f"{where}: normalize_activations={norm!r} rescales inputs at run time; fold the "
                       "scaling into the weights first (SAELens: fold_activation_norm_scaling_factor)")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    unsupported = [k for k in ("apply_finetuning_scaling_factor", "rescale_acts_by_decoder_norm") if cfg.get(k)]
    if activation not in ("relu", None) or unsupported:
        raise RunError(f"{where}: {', '.join(unsupported) or f'activation {activation!r}'} is not supported")
    if (cfg.get("metadata") or {}).get("hook_head_index", cfg.get("hook_head_index")) is not None:
        raise RunError(f"{where}: an SAE of a single attention head (hook_head_index) is not supported")
    t = {k: v.to(torch.float32) for k, v in tensors.items()}
    missing = [k for k in ("W_enc", "W_dec", "b_dec") if k not in t]
    if missing:
        raise RunError(f"{where}: {SAELENS_WEIGHTS} lacks {', '.join(missing)} (it holds {', '.join(sorted(t))})")
    W_enc, W_dec, b_dec = t["W_enc"], t["W_dec"], t["b_dec"]
    centred = bool(cfg.get("apply_b_dec_to_input", True))     # SAELens's default
    if arch == "gated":
        b_gate, b_mag, r_mag = t["b_gate"], t["b_mag"], t["r_mag"]
        if not centred:     # ours always encodes x - b_dec: move + b_dec W into the biases
            b_gate, b_mag = b_gate + b_dec @ W_enc, b_mag + b_dec @ (W_enc * r_mag.exp())
        return GatedSAE.from_tensors(W_enc=W_enc, W_dec=W_dec, b_dec=b_dec, b_gate=b_gate, r_mag=r_mag, b_mag=b_mag)
    b_enc = t["b_enc"] - b_dec @ W_enc if centred else t["b_enc"]
    if arch == "topk":
        return TopKSAE.from_tensors(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, k=int(cfg["k"]))
    if arch == "standard":
        return ReLUSAE.from_tensors(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec)
    threshold = t["threshold"] if "threshold" in t else t["log_threshold"].exp()
    if (threshold < 0).any():
        raise RunError(f"{where}: negative thresholds (SAELens's relu would silence latents ours lets fire)")
    return JumpReLUSAE.from_tensors(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)


def load_saelens_folder(path: Path, cfg, device: str = "cpu") -> EvalTarget:
    """A SAELens folder: written by SAELens (`SAE.save_model`) or by our export (whose metadata record
    the cache and held-out rule); the site comes from the hook name, the cache from cfg if not recorded."""
    from safetensors.torch import load_file
    where = f"SAELens folder {str(path)!r}"
    try:
        sl_cfg = json.loads((path / SAELENS_CFG).read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{where}: {SAELENS_CFG} is not valid JSON ({e})") from None
    sae = _saelens_sae(sl_cfg, load_file(str(path / SAELENS_WEIGHTS)), where).to(device).eval()
    metadata = sl_cfg.get("metadata") or {}
    ours = metadata.get("jumpscope") or {}
    hook = metadata.get("hook_name", sl_cfg.get("hook_name"))
    layer, sublayer = _site_of_hook(hook)
    label = architecture_label(ours) if ours.get("architecture") else f"saelens-{sl_cfg.get('architecture', 'standard')}"
    meta = {**ours, "architecture": sae.architecture, "label": label, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "source": "saelens", "hook_name": hook,
            "model": ours.get("model") or metadata.get("model_name", sl_cfg.get("model_name")),
            "layer": ours.get("layer", layer), "sublayer": ours.get("sublayer", sublayer)}
    layer, sublayer, cache = _site(meta, cfg, where)
    heldout = dict(meta.get("heldout") or default_heldout())
    if cfg.heldout_fraction is not None:
        heldout["fraction"] = float(cfg.heldout_fraction)
    if cfg.heldout_seed is not None:
        heldout["seed"] = int(cfg.heldout_seed)
    return EvalTarget(name=path.name, path=path, sae=sae, meta=meta, layer=layer, sublayer=sublayer, cache=cache,
                      heldout=heldout)


def resolve(cfg, device: str = "cpu") -> tuple[list[EvalTarget], bool]:
    """(targets, is_sweep) for cfg.run."""
    path = Path(cfg.run)
    if not path.exists():
        raise RunError(f"run={str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise RunError(f"run={str(path)!r} is a file but not a Gemma Scope .npz")
        return [load_params(path, cfg, device)], False
    if _is_run_folder(path) or (path / "sae.safetensors").is_file():
        return [load_run_folder(path, cfg, device)], False
    if (path / PARAMS_FILE).is_file():
        return [load_params(path / PARAMS_FILE, cfg, device)], False
    if _is_saelens_folder(path):
        return [load_saelens_folder(path, cfg, device)], False
    members = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_folder(p))
    if members:
        unfinished = sorted(p.name for p in path.iterdir() if p.is_dir() and not _is_run_folder(p)
                            and any(p.iterdir()) and not p.name.startswith((".", "eval")))
        targets = [load_run_folder(p, cfg, device) for p in members]
        for t in targets:
            if unfinished:
                t.notes.append(f"sweep members without a final SAE, not evaluated: {', '.join(unfinished)}")
        return targets, True
    present = sorted(p.name for p in path.iterdir())
    raise RunError(f"{str(path)!r} is neither a run folder (no sae.json + sae.safetensors: training "
                   f"unfinished?), nor a sweep folder (no member holds one), nor holds a {PARAMS_FILE} or a "
                   f"SAELens {SAELENS_CFG} + {SAELENS_WEIGHTS}. "
                   f"It holds: {', '.join(present) or 'nothing'}")

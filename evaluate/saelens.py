"""SAELens's folder format: `cfg.json` + `sae_weights.safetensors`, loadable by `SAE.load_from_disk`.

Each of our architectures maps onto a SAELens one computing the same function on raw inputs:
jumprelu and batchtopk -> jumprelu, relu -> standard, topk -> topk, gated -> gated (which, like ours, subtracts
b_dec from its input: apply_b_dec_to_input). No normalisation at run time: ours is folded in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from .errors import EvalInputError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens config format (>= 6.0) we write; older versions are converted on load by SAELens.
SAELENS_FORMAT_VERSION = "6.0.0"

# TransformerLens hook names of DESIGN.md's sublayers.
HOOK_NAMES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_z": "blocks.{layer}.attn.hook_z",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
}


class SAELensExportError(EvalInputError):
    pass


def hook_name(layer: int, sublayer: str) -> str:
    if sublayer not in HOOK_NAMES:
        raise SAELensExportError(f"unknown sublayer {sublayer!r}; choose from {', '.join(HOOK_NAMES)}")
    return HOOK_NAMES[sublayer].format(layer=int(layer))


def _tensors_and_cfg(sae: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    arch = getattr(sae, "architecture", "")
    common = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch in ("jumprelu", "batchtopk"):      # a trained BatchTopK is used as a JumpReLU
        if (sae.threshold < 0).any():
            raise SAELensExportError("negative thresholds: SAELens's jumprelu applies a relu that ours does not")
        return ({**common, "b_enc": sae.b_enc, "threshold": sae.threshold},
                {"architecture": "jumprelu", "apply_b_dec_to_input": False})
    if arch == "relu":
        return {**common, "b_enc": sae.b_enc}, {"architecture": "standard", "apply_b_dec_to_input": False}
    if arch == "topk":
        return ({**common, "b_enc": sae.b_enc},
                {"architecture": "topk", "apply_b_dec_to_input": False, "k": int(sae.k)})
    if arch == "gated":
        return ({**common, "b_gate": sae.b_gate, "r_mag": sae.r_mag, "b_mag": sae.b_mag},
                {"architecture": "gated", "apply_b_dec_to_input": True})
    raise SAELensExportError(f"no SAELens equivalent known for architecture {arch!r}")


def write_saelens(sae: torch.nn.Module, folder: Path, *, layer: int, sublayer: str, model_name: Optional[str],
                  context_size: Optional[int], dataset: Optional[str], extra: Optional[dict] = None) -> None:
    """Write the SAELens folder into `folder` (which must exist and be empty)."""
    tensors, arch_cfg = _tensors_and_cfg(sae)
    cfg = {
        **arch_cfg,
        "d_in": int(sae.d_in),
        "d_sae": int(sae.d_sae),
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        # TransformerLens's hook_z is [..., n_heads, d_head]; our attn_z is its flattening.
        "reshape_activations": "hook_z" if sublayer == "attn_z" else "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "model_name": model_name,
            "hook_name": hook_name(layer, sublayer),
            "hook_head_index": None,
            "context_size": context_size,
            "dataset_path": dataset,
            "prepend_bos": True,
            "model_class_name": "HookedTransformer",
            "exported_by": "jumpscope",
            **(extra or {}),
        },
    }
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
              str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")

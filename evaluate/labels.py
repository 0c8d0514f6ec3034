"""How an SAE is named in tables and plots: its architecture with its sparsity loss, and the knob
that set its sparsity."""
from __future__ import annotations

from typing import Any


def sparsity_setting(meta: dict) -> str:
    """The knob that sets sparsity, as trained: k for TopK, lambda (and its loss) otherwise."""
    if meta.get("sparsity"):
        return meta["sparsity"]
    hyper = meta.get("hyperparameters") or {}
    arch = meta.get("architecture", "?")
    if arch in ("topk", "batchtopk"):
        return f"k={hyper.get('k', meta.get('k', '?'))}"
    target = _find(meta, "target_l0")
    if arch == "jumprelu" and _find(meta, "sparsity_loss") == "quadratic" and target:
        return f"target L0={target:g}"
    coeff = _find(meta, "sparsity_coeff")
    label = "lambda" if coeff is not None else ""
    return f"{label}={coeff:g}" if isinstance(coeff, (int, float)) else label or "-"


def _find(d: Any, key: str):
    """The first value of `key` anywhere in a nested dict (sae.json layouts nest the config)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def architecture_label(meta: dict) -> str:
    """jumprelu is split by its sparsity loss: the ablation's question is L0 against L1."""
    if meta.get("label"):
        return meta["label"]
    arch = meta.get("architecture", "?")
    if arch == "jumprelu":
        loss = (meta.get("hyperparameters") or {}).get("sparsity_loss") or _find(meta, "sparsity_loss") or "l0"
        return f"jumprelu+{loss}"
    if arch in ("relu", "gated"):
        return f"{arch}+l1"
    return arch

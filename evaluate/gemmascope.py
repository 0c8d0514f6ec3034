"""Gemma Scope's `params.npz`: W_enc [d, W], W_dec [W, d], b_enc [W], b_dec [d], threshold [W],
float32, raw activation units, f = (pre > threshold) * relu(pre).

Our JumpReLU computes f = pre * (pre > threshold); the two agree wherever threshold >= 0, which is
checked on both ways. A ReLU SAE is the JumpReLU with threshold 0, so it exports too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import EvalInputError

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


class GemmaScopeError(EvalInputError):
    pass


def params_from_sae(sae: torch.nn.Module) -> dict[str, np.ndarray]:
    """The params.npz arrays of an SAE in raw units (what `train.run_folder.load_sae` returns)."""
    arch = getattr(sae, "architecture", "")
    if arch not in ("jumprelu", "relu", "batchtopk"):
        raise GemmaScopeError(
            f"Gemma Scope's params.npz holds JumpReLU SAEs; a {arch!r} SAE cannot be written in it "
            "(export it with FORMAT=saelens)")
    threshold = torch.zeros(sae.d_sae) if arch == "relu" else sae.threshold   # batchtopk: a JumpReLU
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec,
               "threshold": threshold}
    params = {k: v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in tensors.items()}
    if (params["threshold"] < 0).any():
        raise GemmaScopeError("negative thresholds: Gemma Scope's relu would silence latents that ours lets fire")
    return params


def write_params(params: dict[str, np.ndarray], path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{k: np.ascontiguousarray(params[k], dtype=np.float32) for k in KEYS})


def read_params(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise GemmaScopeError(f"no Gemma Scope params file at {str(path)!r}")
    with np.load(path) as npz:
        missing = [k for k in KEYS if k not in npz.files]
        if missing:
            raise GemmaScopeError(f"{path} is not a Gemma Scope params.npz: it lacks {', '.join(missing)} "
                                  f"(it holds {', '.join(npz.files) or 'nothing'})")
        params = {k: np.asarray(npz[k]) for k in KEYS}
    d, W = params["W_enc"].shape if params["W_enc"].ndim == 2 else (None, None)
    expected = {"W_enc": (d, W), "W_dec": (W, d), "b_enc": (W,), "b_dec": (d,), "threshold": (W,)}
    for k, shape in expected.items():
        if d is None or params[k].shape != shape:
            raise GemmaScopeError(f"{path}: {k} has shape {params[k].shape}, expected {shape} "
                                  f"(from W_enc {params['W_enc'].shape})")
    return params


def sae_from_params(params: dict[str, np.ndarray]) -> torch.nn.Module:
    """Our JumpReLU SAE from Gemma Scope arrays, bit for bit."""
    from train.sae import JumpReLUSAE
    if (params["threshold"] < 0).any():
        raise GemmaScopeError("params.npz has negative thresholds, which our JumpReLU cannot represent")
    return JumpReLUSAE.from_tensors(**{k: torch.from_numpy(np.asarray(params[k], dtype=np.float32))
                                       for k in KEYS})


def load_params_npz(path) -> torch.nn.Module:
    return sae_from_params(read_params(path))

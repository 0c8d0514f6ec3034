"""Recovery of known features (synthetic caches): how well an SAE's decoder rows match the true
feature directions the data was generated from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import EvalInputError


def load_features(path, d_in: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"true_features={str(path)!r}: no such file (a .npy of [n_features, d_in])")
    features = np.load(path)
    if features.ndim != 2 or features.shape[1] != d_in:
        raise EvalInputError(f"true_features {str(path)!r} has shape {features.shape}; expected [n_features, {d_in}]")
    return features


def feature_recovery(W_dec: torch.Tensor, features: np.ndarray, threshold: float = 0.9) -> dict:
    """For each true feature the best cosine similarity with any decoder row; their mean (MMCS) and
    the fraction of features some row matches above `threshold`."""
    dec = W_dec.detach().double().cpu()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = torch.from_numpy(np.asarray(features, dtype=np.float64))
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (true @ dec.T).max(dim=1).values
    return {"mean_max_cosine": float(best.mean()), "recovered_fraction": float((best > threshold).double().mean()),
            "threshold": threshold, "n_features": int(len(true))}

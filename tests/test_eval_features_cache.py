"""One small harvest of the embedded (trained) tiny Gemma 2, shared by the feature browser and SAEBench
tests of a session (no tests here): layer 2 mlp_out and attn_z, 64 sequences of 64 tokens."""
from pathlib import Path

import torch

from tests.harvest_util import harvest_inprocess
from train.run_folder import save_sae
from train.sae import JumpReLUSAE

LAYER = 2
HELDOUT = {"fraction": 0.25, "seed": 1}


def tiny_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "tiny_features_cache"
    done = path.parent / "tiny_features_cache.done"
    if not done.exists():
        harvest_inprocess(path, [f"layers={LAYER}", "sublayers='mlp_out,attn_z'"])
        done.touch()
    return path


def calibrated_jumprelu(x: torch.Tensor, d_sae: int, firing: float = 0.05, seed: int = 0) -> JumpReLUSAE:
    """A JumpReLU SAE with random unit decoder rows (encoder = decoder^T) whose thresholds make each
    latent fire on about `firing` of the rows of x: sparse codes with varied latents, like a trained SAE."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, x.shape[1], generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    pre = x.float() @ W_dec.T
    rank = min(len(pre), max(1, int(round((1 - firing) * len(pre)))))
    threshold = torch.kthvalue(pre, rank, dim=0).values.clamp_min(1e-3)     # (torch.quantile is slow here)
    return JumpReLUSAE.from_tensors(W_enc=W_dec.T.clone(), W_dec=W_dec, b_enc=torch.zeros(d_sae),
                                    b_dec=torch.zeros(x.shape[1]), threshold=threshold)


def save_run(folder: Path, sae, cache: Path, sublayer: str = "mlp_out", layer: int = LAYER) -> Path:
    save_sae(folder, sae, {"model": "embedded:tiny", "layer": layer, "sublayer": sublayer, "cache": str(cache),
                           "heldout": HELDOUT})
    return folder

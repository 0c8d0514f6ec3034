"""The logit lens of an SAE's decoder: the tokens each latent's decoder direction promotes and
suppresses through the model's unembedding.

A direction d written at the site reaches the residual stream (for attn_z: through o_proj and then
post_attention_layernorm, which like every RMSNorm multiplies by (1 + weight) after a positive scale)
and the logits as softcap(norm(h) W_U^T). Positive scales and Gemma 2's final soft-capping (tanh) do
not change a ranking, so each latent's scores are (d * (1 + w_final)) W_U^T, with W_U the unembedding
(tied to embed_tokens in Gemma 2). This is the direct path alone: later layers are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class LogitLens:
    top_ids: torch.Tensor            # [W, n] promoted tokens, strongest first
    top_values: torch.Tensor
    bottom_ids: torch.Tensor         # [W, n] suppressed tokens, strongest first
    bottom_values: torch.Tensor


def _norm_gain(norm: torch.nn.Module) -> torch.Tensor:
    """The elementwise factor of an RMSNorm: Gemma's (1 + weight)."""
    return 1.0 + norm.weight.detach().float()


def residual_directions(model: torch.nn.Module, W_dec: torch.Tensor, layer: int, sublayer: str) -> torch.Tensor:
    """[W, d_model]: the decoder rows as directions in the residual stream."""
    d = W_dec.detach().float()
    if sublayer == "attn_z":
        block = model.model.layers[layer]
        o_proj = block.self_attn.o_proj.weight.detach().float().to(d.device)   # [d_model, heads * head_dim]
        d = (d @ o_proj.T) * _norm_gain(block.post_attention_layernorm).to(d.device)
    return d


@torch.no_grad()
def logit_lens(model: torch.nn.Module, W_dec: torch.Tensor, layer: int, sublayer: str, n_tokens: int = 10,
               latents_per_chunk: int = 512, progress: bool = True) -> LogitLens:
    device = next(model.parameters()).device
    unembed = model.get_output_embeddings().weight.detach().float()           # [V, d_model]
    gain = _norm_gain(model.model.norm).to(device)
    W = W_dec.shape[0]
    n = min(int(n_tokens), unembed.shape[0])
    out = {k: [] for k in ("ti", "tv", "bi", "bv")}
    # Real Gemma has 256k tokens: [chunk, V] scores at a time (512 x 256k floats: 0.5 GB)
    chunk = max(1, min(latents_per_chunk, 2 ** 27 // unembed.shape[0]))
    for lo in tqdm(range(0, W, chunk), desc="logit lens", unit="chunk", disable=not progress):
        d = residual_directions(model, W_dec[lo:lo + chunk].to(device), layer, sublayer) * gain
        scores = d @ unembed.T
        top, bottom = scores.topk(n, dim=-1), (-scores).topk(n, dim=-1)
        out["ti"].append(top.indices.cpu()), out["tv"].append(top.values.cpu())
        out["bi"].append(bottom.indices.cpu()), out["bv"].append(-bottom.values.cpu())
    return LogitLens(*(torch.cat(out[k]) for k in ("ti", "tv", "bi", "bv")))

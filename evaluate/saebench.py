"""SAEBench's core metrics, under SAEBench's names, so that our numbers sit beside the ones it publishes.

SAEBench (Karvonen et al. 2025, github.com/adamkarvonen/SAEBench, `sae_bench/evals/core/main.py`)
defines them as follows, and this module computes exactly these. Notation: x an SAE input, x_hat its
reconstruction, f its latent code; "tokens" are the evaluated tokens (below); a "group" is one of
SAEBench's batches, here `group_sequences` consecutive held-out sequences (SAEBench's default batch:
16 prompts).

- explained_variance: mean over tokens of 1 - ||x - x_hat||^2 / ||x - m||^2, m the mean of x over the
  token's group. (A mean of per-token ratios; our `fvu` is the pooled ratio over all tokens.)
- cossim: mean over tokens of x . x_hat / (||x|| ||x_hat||).
- l2_norm_in, l2_norm_out: mean over tokens of ||x||, of ||x_hat||.
- l2_ratio: mean over tokens of ||x_hat|| / ||x|| (an ||x|| below 1e-4 is replaced by 1).
- relative_reconstruction_bias: mean over groups of mean(||x_hat||^2) / mean(x . x_hat) within the
  group (eq. 10 of arXiv 2404.16014; 1 is unbiased, below 1 is shrinkage).
- l0: mean over tokens of #{i : f_i != 0};  l1: mean over tokens of sum_i f_i.
- frac_alive, freq_over_1_percent, freq_over_10_percent: fraction of latents whose density (the
  fraction of tokens with f_i > 0) is > 0, > 0.01, > 0.1; normalized_freq_over_{1,10}_percent: the
  share of all firings that those latents account for.
- kl_div_score = (KL_ablation - KL_sae) / KL_ablation and ce_loss_score = (CE_ablation - CE_sae) /
  (CE_ablation - CE_clean), KL(clean || variant) and CE the mean per-prediction next-token values, the
  ablation being zero-ablation of the site. Beside them, as this project adds: the same scores against
  mean-ablation (`*_mean_ablation`).

Where this differs from SAEBench, and why:
- Data: the cache's held-out sequences (never served in training), in their order, instead of a fresh
  shuffled stream; tokens are those whose id is not BOS, EOS or pad (SAEBench's ignore_tokens) and
  that are not at position 0 (always BOS here).
- CE and KL come from `evaluate.delta_lm`'s forwards: BOS positions are never replaced, neither by the
  reconstruction nor by the ablation (SAEBench by default replaces and zero-ablates BOS too, whose
  huge Gemma norms then dominate the ablation), and every prediction of a sequence is averaged
  (SAEBench drops those made at BOS, EOS or pad; at BOS all variants agree, so only EOS matters).
- cossim counts a token whose x_hat is exactly zero as 0; SAEBench divides by zero there (NaN, which its
  JSON writes as -1).
- SAEBench's `mse` (each token's squared error divided by the number of tokens in its batch, then
  averaged: a quantity that shrinks with the batch size) is not reproduced; `reconstruction.mse` is the
  mean squared error per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

# SAEBench's `batch_size_prompts` default: its groups for explained variance and reconstruction bias.
DEFAULT_GROUP_SEQUENCES = 16
SMALL_NORM = 1e-4             # SAEBench's floor below which ||x|| is replaced by 1 in l2_ratio


@dataclass
class SAEBenchReconstruction:
    n_tokens: int
    explained_variance: float
    cossim: float
    l2_norm_in: float
    l2_norm_out: float
    l2_ratio: float
    relative_reconstruction_bias: float
    l0: float
    l1: float
    feature_density: List[float]     # per latent: fraction of tokens with f_i > 0


class SAEBenchAccumulator:
    """Feed it batches of [n_seq, T, d] inputs with their codes and reconstructions and a [n_seq, T]
    mask of the tokens to count; sequences are grouped `group_sequences` at a time, across batches."""

    def __init__(self, d_sae: int, group_sequences: int = DEFAULT_GROUP_SEQUENCES):
        if group_sequences < 1:
            raise ValueError(f"group_sequences must be >= 1, got {group_sequences}")
        self.d_sae, self.group_sequences = int(d_sae), int(group_sequences)
        self.n = 0
        self.sums = torch.zeros(6, dtype=torch.float64)   # ev, cos, norm_in, norm_out, l2_ratio, l0
        self.l1 = torch.zeros((), dtype=torch.float64)
        self.density = torch.zeros(self.d_sae, dtype=torch.float64)
        self.biases: List[float] = []
        self._pending: List[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # (x, x_hat, keep)
        self._pending_sequences = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, keep: torch.Tensor) -> None:
        n_seq, T, d = x.shape
        f = f.reshape(n_seq * T, -1)
        keep_flat = keep.reshape(-1).to(x.device)
        fk = f[keep_flat]
        self.n += int(keep_flat.sum())
        self.sums[5] += (fk != 0).sum(dtype=torch.float64).cpu()
        self.l1 += fk.double().sum().cpu()
        self.density += (fk > 0).sum(0, dtype=torch.float64).cpu()
        x_hat = x_hat.reshape(n_seq, T, d)
        start = 0
        while start < n_seq:
            take = min(n_seq - start, self.group_sequences - self._pending_sequences)
            sl = slice(start, start + take)
            self._pending.append((x[sl], x_hat[sl], keep[sl].to(x.device)))
            self._pending_sequences += take
            start += take
            if self._pending_sequences == self.group_sequences:
                self._close_group()

    def _close_group(self) -> None:
        if not self._pending:
            return
        keep = torch.cat([k.reshape(-1) for _, _, k in self._pending])
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a, _, _ in self._pending])[keep].double()
        x_hat = torch.cat([b.reshape(-1, b.shape[-1]) for _, b, _ in self._pending])[keep].double()
        self._pending, self._pending_sequences = [], 0
        if len(x) == 0:
            return
        resid = (x - x_hat).pow(2).sum(-1)
        total = (x - x.mean(0)).pow(2).sum(-1)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        dot = (x * x_hat).sum(-1)
        denom = norm_in * norm_out
        cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), torch.zeros_like(dot))
        ratio = norm_out / torch.where(norm_in < SMALL_NORM, torch.ones_like(norm_in), norm_in)
        self.sums[:5] += torch.stack([(1 - resid / total).sum(), cos.sum(), norm_in.sum(), norm_out.sum(),
                                      ratio.sum()]).cpu()
        self.biases.append(float(norm_out.pow(2).mean() / dot.mean()))

    def result(self) -> SAEBenchReconstruction:
        self._close_group()
        if self.n == 0:
            raise ValueError("no held-out tokens to evaluate on (all BOS, EOS or pad)")
        ev, cos, norm_in, norm_out, ratio, l0 = (float(v) / self.n for v in self.sums)
        return SAEBenchReconstruction(
            n_tokens=self.n, explained_variance=ev, cossim=cos, l2_norm_in=norm_in, l2_norm_out=norm_out,
            l2_ratio=ratio,
            relative_reconstruction_bias=sum(self.biases) / len(self.biases) if self.biases else float("nan"),
            l0=l0, l1=float(self.l1) / self.n, feature_density=(self.density / self.n).tolist())


def ignored_token_ids(cache_attrs: dict, bos_token_id: int) -> list[int]:
    """SAEBench's ignore_tokens: BOS, and the EOS and pad ids of the model the cache records."""
    config = cache_attrs.get("model_config") if isinstance(cache_attrs.get("model_config"), dict) else {}
    ids = {int(bos_token_id)}
    for key in ("eos_token_id", "pad_token_id"):
        value = config.get(key)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, int):
                ids.add(v)
    return sorted(ids)


def counted_tokens(tokens: torch.Tensor, ignored: list[int]) -> torch.Tensor:
    """[n_seq, T] bool: the tokens SAEBench's metrics count (never position 0, never an ignored id)."""
    keep = ~torch.isin(tokens, torch.tensor(ignored, dtype=tokens.dtype, device=tokens.device))
    keep[:, 0] = False
    return keep


def _score(ablated: Optional[float], spliced: Optional[float], reference: float) -> float:
    """(ablated - spliced) / (ablated - reference), NaN when undefined."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (ablated, spliced, reference)):
        return float("nan")
    denom = ablated - reference
    return (ablated - spliced) / denom if denom != 0 else float("nan")


def misc_metrics(density: List[float]) -> dict:
    d = torch.tensor(density, dtype=torch.float64)
    total = float(d.sum())
    share = lambda above: float(d[d > above].sum()) / total if total > 0 else 0.0
    return {"frac_alive": float((d > 0).double().mean()),
            "freq_over_1_percent": float((d > 0.01).double().mean()),
            "freq_over_10_percent": float((d > 0.1).double().mean()),
            "normalized_freq_over_1_percent": share(0.01),
            "normalized_freq_over_10_percent": share(0.1)}


def saebench_metrics(rec: SAEBenchReconstruction, delta_lm: dict) -> dict:
    """report.json's `saebench` section: SAEBench's metric categories and names (module docstring)."""
    nan = float("nan")
    lm = {k: v for k, v in (delta_lm or {}).items() if isinstance(v, (int, float))}
    get = lambda k: lm.get(k, nan)
    return {
        "model_behavior_preservation": {
            "kl_div_score": _score(get("kl_zero"), get("kl_spliced"), 0.0),
            "kl_div_with_ablation": get("kl_zero"),
            "kl_div_with_sae": get("kl_spliced"),
            "kl_div_score_mean_ablation": _score(get("kl_mean"), get("kl_spliced"), 0.0),
            "kl_div_with_mean_ablation": get("kl_mean"),
        },
        "model_performance_preservation": {
            "ce_loss_score": _score(get("ce_zero"), get("ce_spliced"), get("ce_clean")),
            "ce_loss_with_ablation": get("ce_zero"),
            "ce_loss_with_sae": get("ce_spliced"),
            "ce_loss_without_sae": get("ce_clean"),
            "ce_loss_score_mean_ablation": _score(get("ce_mean"), get("ce_spliced"), get("ce_clean")),
            "ce_loss_with_mean_ablation": get("ce_mean"),
        },
        "reconstruction_quality": {"explained_variance": rec.explained_variance, "cossim": rec.cossim},
        "shrinkage": {"l2_norm_in": rec.l2_norm_in, "l2_norm_out": rec.l2_norm_out, "l2_ratio": rec.l2_ratio,
                      "relative_reconstruction_bias": rec.relative_reconstruction_bias},
        "sparsity": {"l0": rec.l0, "l1": rec.l1},
        "misc_metrics": misc_metrics(rec.feature_density),
        "token_stats": {"total_tokens_eval_reconstruction": int(lm.get("n_predictions", 0)),
                        "total_tokens_eval_sparsity_variance": rec.n_tokens},
        "definitions": "evaluate/saebench.py (SAEBench core metrics; differences listed there)",
    }


# The columns table.md / table.csv show, flattened from the section above.
TABLE_METRICS = (("reconstruction_quality", "explained_variance"), ("reconstruction_quality", "cossim"),
                 ("shrinkage", "l2_ratio"), ("shrinkage", "relative_reconstruction_bias"),
                 ("model_behavior_preservation", "kl_div_score"),
                 ("model_performance_preservation", "ce_loss_score"),
                 ("model_performance_preservation", "ce_loss_score_mean_ablation"), ("sparsity", "l1"),
                 ("misc_metrics", "frac_alive"), ("misc_metrics", "freq_over_1_percent"),
                 ("misc_metrics", "freq_over_10_percent"))


def table_values(section: Optional[dict]) -> dict:
    section = section or {}
    return {name: (section.get(category) or {}).get(name, float("nan")) for category, name in TABLE_METRICS}

"""Delta LM loss: the model's next-token loss with an SAE's reconstruction spliced in at its site.

Per batch of held-out sequences: a clean forward, a zero-ablated one (the site's activation replaced
by zeros), a mean-ablated one (replaced by the site's mean activation over held-out non-BOS tokens:
the stronger baseline) and one spliced forward per SAE (replaced by its reconstruction). BOS
positions are never touched: their activations are outliers no SAE is trained on. Reported: the
cross-entropy of each, the increase over clean, the fraction of loss recovered against zero-ablation
(CE_zero - CE_spliced) / (CE_zero - CE_clean) and against mean-ablation, and mean per-token
KL(clean || variant).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .errors import EvalInputError
from .heldout import non_bos_mask

# splice(model, layer, sublayer, fn) -> context manager replacing the site's activation a by fn(a).
Splice = Callable[[torch.nn.Module, int, str, Callable[[torch.Tensor], torch.Tensor]], ContextManager]


@dataclass
class DeltaLMResult:
    n_sequences: int
    n_predictions: int
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    delta_ce: float              # ce_spliced - ce_clean
    fraction_recovered: float    # (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    kl_spliced: float            # mean over predictions of KL(clean || spliced)
    kl_zero: float               # mean over predictions of KL(clean || zero-ablated)
    ce_mean: float = float("nan")                 # mean-ablated (nan: no mean activation given)
    fraction_recovered_mean: float = float("nan")  # (ce_mean - ce_spliced) / (ce_mean - ce_clean)
    kl_mean: float = float("nan")
    # Standard errors over the sequences (their unit of sampling) of delta_ce and of kl_spliced: on a
    # few dozen sequences delta_ce is often within two of them of another SAE's.
    delta_ce_se: float = float("nan")
    kl_spliced_se: float = float("nan")
    # Per sequence (in the order of the tokens given): the CE increase over clean and the KL, each a
    # mean over the sequence's predictions (their means are delta_ce and kl_spliced). Two SAEs scored on
    # the same sequences are compared by the standard error of their per-sequence differences, far
    # smaller than the two errors above taken as independent (quality/report.py).
    delta_ce_per_sequence: List[float] = field(default_factory=list)
    kl_per_sequence: List[float] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


@dataclass
class SiteAblation:
    """What removing a site's information costs: the loss with it zeroed and with it set to its mean."""
    n_sequences: int
    n_predictions: int
    ce_clean: float
    ce_zero: float
    ce_mean: float
    kl_zero: float
    kl_mean: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def check_site(model: torch.nn.Module, layer: int, sublayer: str, d_in: int) -> None:
    """Clear errors when the SAE's site does not exist in the model or has another width."""
    from harvest.sites import SUBLAYERS, site_width
    if sublayer not in SUBLAYERS:
        raise EvalInputError(f"unknown sublayer {sublayer!r}; choose from {', '.join(SUBLAYERS)}")
    config = model.config
    n_layers = config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise EvalInputError(f"the SAE's site is layer {layer}, but the model has layers 0..{n_layers - 1}")
    width = site_width(config, sublayer)
    if width != d_in:
        raise EvalInputError(
            f"width mismatch: the SAE reads {d_in}-dimensional activations but layer {layer} "
            f"{sublayer} of the model ({getattr(config, '_name_or_path', '') or type(model).__name__}) "
            f"is {width} wide: wrong model or wrong site for this SAE")


def _losses(logits: torch.Tensor, targets: torch.Tensor, clean_logits: Optional[torch.Tensor],
            rows_per_chunk: Optional[int] = None):
    """Per sequence ([batch] float64): the summed next-token cross-entropy and (given clean_logits) the
    summed KL(clean || logits); None for the KL without clean_logits.

    Logits of real Gemma are [batch, T, 256000]: log-softmax goes a chunk of rows at a time (~1 GB).
    """
    B, V = logits.shape[0], logits.shape[-1]
    logits = logits.reshape(-1, V)
    targets = targets.reshape(-1)
    clean = clean_logits.reshape(-1, V) if clean_logits is not None else None
    rows = rows_per_chunk or max(1, 2**28 // V)
    ce = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    kl = torch.empty_like(ce) if clean is not None else None
    for i in range(0, logits.shape[0], rows):
        logp = torch.log_softmax(logits[i:i + rows].float(), dim=-1)
        ce[i:i + rows] = -logp.gather(-1, targets[i:i + rows, None])[:, 0].double()
        if clean is not None:
            clean_logp = torch.log_softmax(clean[i:i + rows].float(), dim=-1)
            kl[i:i + rows] = (clean_logp.exp() * (clean_logp - logp)).sum(-1).double()
    return ce.view(B, -1).sum(1), (kl.view(B, -1).sum(1) if kl is not None else None)


def _standard_error(per_sequence: torch.Tensor) -> float:
    """Standard error of the mean over sequences (every sequence has as many predictions); the
    predictions within a sequence are not independent, so the sequence is the unit of sampling."""
    n = len(per_sequence)
    return float(per_sequence.std(correction=1) / n ** 0.5) if n > 1 else float("nan")


def _replace_non_bos(keep: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Splice function applying fn at the positions where keep is True, leaving BOS as it was."""
    def apply(a: torch.Tensor) -> torch.Tensor:
        if a.shape[:2] != keep.shape:
            raise RuntimeError(f"site activation of shape {tuple(a.shape)} does not match the batch "
                               f"of tokens {tuple(keep.shape)}")
        return torch.where(keep[..., None], fn(a).to(a.dtype), a)
    return apply


def _sae_reconstruction(sae: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def reconstruct(a: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        x = a.reshape(-1, shape[-1]).to(device=next(sae.parameters(), a).device, dtype=torch.float32)
        return sae.decode(sae.encode(x)).reshape(shape).to(a.device)
    return reconstruct


def delta_lm_loss(model: torch.nn.Module, tokens: torch.Tensor, layer: int, sublayer: str,
                  sae: torch.nn.Module, bos_token_id: int, splice: Optional[Splice] = None,
                  batch_sequences: int = 8, progress: bool = True,
                  mean_activation: Optional[torch.Tensor] = None) -> DeltaLMResult:
    """Delta LM loss of `sae` at (layer, sublayer) on `tokens` ([n_sequences, T] token ids)."""
    return delta_lm_losses(model, tokens, layer, sublayer, [sae], bos_token_id, splice, batch_sequences,
                           progress, mean_activation)[0]


@dataclass
class VariantLoss:
    """Mean per-prediction CE and KL(clean || variant) of a variant, and the standard errors (over
    sequences) of its CE increase over clean and of its KL."""
    ce: float
    kl: float
    delta_ce_se: float
    kl_se: float
    delta_ce_per_sequence: List[float]
    kl_per_sequence: List[float]


@torch.no_grad()
def _variant_losses(model, tokens: torch.Tensor, layer: int, sublayer: str, variants: dict,
                    bos_token_id: int, splice: Optional[Splice], batch_sequences: int, desc: str,
                    progress: bool) -> tuple[float, dict, int]:
    """(mean clean CE, {variant: VariantLoss}, predictions): one clean forward per batch, shared by every
    variant (a function replacing the site's non-BOS activations)."""
    if splice is None:
        from harvest.sites import splice
    device = next(model.parameters()).device
    tokens = tokens.long()
    n_seq, T = tokens.shape
    if T < 2:
        raise ValueError("sequences need at least two tokens for next-token loss")
    clean_seqs = []
    seqs = {name: ([], []) for name in variants}
    model.eval()
    bar = tqdm(total=n_seq * (len(variants) + 1), desc=desc, unit="fwd-seq", disable=not progress)
    for start in range(0, n_seq, batch_sequences):
        batch = tokens[start:start + batch_sequences].to(device)
        targets = batch[:, 1:]
        keep = non_bos_mask(batch, bos_token_id)
        clean = model(input_ids=batch, use_cache=False).logits[:, :-1]
        clean_seqs.append(_losses(clean, targets, None)[0].cpu())
        bar.update(len(batch))
        for name, fn in variants.items():
            with splice(model, layer, sublayer, _replace_non_bos(keep, fn)):
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            ce, kl = _losses(logits, targets, clean)
            del logits
            seqs[name][0].append(ce.cpu())
            seqs[name][1].append(kl.cpu())
            bar.update(len(batch))
        del clean
    bar.close()
    per_pred = 1.0 / (T - 1)
    clean_ce = torch.cat(clean_seqs) * per_pred
    out = {}
    for name, (ce, kl) in seqs.items():
        ce, kl = torch.cat(ce) * per_pred, torch.cat(kl) * per_pred
        out[name] = VariantLoss(ce=float(ce.mean()), kl=float(kl.mean()),
                                delta_ce_se=_standard_error(ce - clean_ce), kl_se=_standard_error(kl),
                                delta_ce_per_sequence=(ce - clean_ce).tolist(), kl_per_sequence=kl.tolist())
    return float(clean_ce.mean()), out, n_seq * (T - 1)


def _mean_fill(mean_activation: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def fill(a: torch.Tensor) -> torch.Tensor:
        if mean_activation.shape[-1] != a.shape[-1]:
            raise EvalInputError(f"the mean activation is {mean_activation.shape[-1]} wide, the site "
                                 f"{a.shape[-1]}")
        return mean_activation.to(device=a.device, dtype=a.dtype).expand_as(a)
    return fill


def site_ablation(model: torch.nn.Module, tokens: torch.Tensor, layer: int, sublayer: str,
                  mean_activation: torch.Tensor, bos_token_id: int, splice: Optional[Splice] = None,
                  batch_sequences: int = 8, progress: bool = True) -> SiteAblation:
    """Zero- and mean-ablation of one site (BOS untouched), against the clean forward."""
    ce_clean, v, n_pred = _variant_losses(
        model, tokens, layer, sublayer, {"zero": torch.zeros_like, "mean": _mean_fill(mean_activation)},
        bos_token_id, splice, batch_sequences, f"ablation L{layer} {sublayer}", progress)
    return SiteAblation(n_sequences=len(tokens), n_predictions=n_pred, ce_clean=ce_clean,
                        ce_zero=v["zero"].ce, ce_mean=v["mean"].ce, kl_zero=v["zero"].kl, kl_mean=v["mean"].kl)


def _recovered(ce_ablated: float, ce_spliced: float, ce_clean: float) -> float:
    denom = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / denom if denom != 0 else float("nan")


def delta_lm_losses(model: torch.nn.Module, tokens: torch.Tensor, layer: int, sublayer: str,
                    saes: list, bos_token_id: int, splice: Optional[Splice] = None,
                    batch_sequences: int = 8, progress: bool = True,
                    mean_activation: Optional[torch.Tensor] = None) -> list[DeltaLMResult]:
    """Delta LM loss of several SAEs of one site: the clean and ablated forwards of each batch are
    run once and shared, so K SAEs cost K + 3 forwards per batch (K + 2 without a mean activation)."""
    for sae in saes:
        check_site(model, layer, sublayer, sae.d_in)
    variants = {"zero": torch.zeros_like}
    if mean_activation is not None:
        variants["mean"] = _mean_fill(mean_activation)
    for i, sae in enumerate(saes):
        variants[i] = _sae_reconstruction(sae)
    ce_clean, v, n_pred = _variant_losses(
        model, tokens, layer, sublayer, variants, bos_token_id, splice, batch_sequences,
        f"delta LM loss L{layer} {sublayer} ({len(saes)} SAE{'s' * (len(saes) > 1)})", progress)
    nan = float("nan")
    ce_zero, kl_zero = v["zero"].ce, v["zero"].kl
    ce_mean, kl_mean = (v["mean"].ce, v["mean"].kl) if "mean" in v else (nan, nan)
    results = []
    for i in range(len(saes)):
        ce_spliced, kl_spliced = v[i].ce, v[i].kl
        results.append(DeltaLMResult(
            n_sequences=len(tokens), n_predictions=n_pred,
            ce_clean=ce_clean, ce_spliced=ce_spliced, ce_zero=ce_zero,
            delta_ce=ce_spliced - ce_clean,
            fraction_recovered=_recovered(ce_zero, ce_spliced, ce_clean),
            kl_spliced=kl_spliced, kl_zero=kl_zero,
            ce_mean=ce_mean, fraction_recovered_mean=_recovered(ce_mean, ce_spliced, ce_clean), kl_mean=kl_mean,
            delta_ce_se=v[i].delta_ce_se, kl_spliced_se=v[i].kl_se,
            delta_ce_per_sequence=v[i].delta_ce_per_sequence, kl_per_sequence=v[i].kl_per_sequence,
            note="" if ce_zero > ce_clean else ("zero-ablating this site does not raise the loss (an untrained "
                                                "model?): fraction recovered is not meaningful here"),
        ))
    return results

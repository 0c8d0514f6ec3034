"""The figures of the model card: cross-entropy of the model and of the n-gram baselines on the
held-out and training sequences, and what zero- and mean-ablating each attention and MLP output costs."""
from __future__ import annotations

import numpy as np
import torch

from .lm_train import cross_entropy
from .ngram import BigramCounts, bigram_cross_entropy, unigram_cross_entropy

ABLATED_SUBLAYERS = ("attn_out", "mlp_out")


@torch.no_grad()
def mean_activations(model, sequences: np.ndarray, sites: list, bos_token_id: int, batch: int = 32) -> dict:
    """Site -> mean activation over the non-BOS positions of `sequences`."""
    from harvest.sites import capture
    sums, n = {}, 0
    model.eval()
    for i in range(0, len(sequences), batch):
        ids = torch.from_numpy(np.asarray(sequences[i:i + batch], dtype=np.int64))
        keep = (ids != bos_token_id).double()
        with capture(model, sites) as store:
            model(input_ids=ids, use_cache=False)
        for site, a in store.items():
            s = (a.double() * keep[..., None]).sum((0, 1))
            sums[site] = sums.get(site, 0) + s
        n += int(keep.sum())
    return {site: (s / n).float() for site, s in sums.items()}


def measure(model, train_seqs: np.ndarray, heldout_seqs: np.ndarray, counts: BigramCounts,
            bos_token_id: int, ablation_sequences: int, seed: int, progress: bool = True) -> dict:
    from evaluate.delta_lm import site_ablation
    from harvest.sites import Site
    probe = train_seqs[np.random.default_rng([seed, 10**6]).permutation(len(train_seqs))[:len(heldout_seqs)]]
    figures = {
        "heldout": {"predictions": int(heldout_seqs.size - len(heldout_seqs)),
                    "model": cross_entropy(model, heldout_seqs),
                    "unigram": unigram_cross_entropy(counts, heldout_seqs),
                    "bigram": bigram_cross_entropy(counts, heldout_seqs)},
        "train_sample": {"predictions": int(probe.size - len(probe)),
                         "model": cross_entropy(model, probe),
                         "unigram": unigram_cross_entropy(counts, probe),
                         "bigram": bigram_cross_entropy(counts, probe)},
    }
    seqs = heldout_seqs[:ablation_sequences]
    n_layers = model.config.num_hidden_layers
    sites = [Site(layer, s) for layer in range(n_layers) for s in ABLATED_SUBLAYERS]
    means = mean_activations(model, seqs, sites, bos_token_id)
    rows = []
    for site in sites:
        r = site_ablation(model, torch.from_numpy(seqs.astype(np.int64)), site.layer, site.sublayer,
                          means[site], bos_token_id, progress=progress)
        rows.append({"layer": site.layer, "sublayer": site.sublayer, **r.to_dict()})
    figures["ablation"] = rows
    return figures

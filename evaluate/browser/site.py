"""Write the browser: static files that open from disk (file://, no server, no network).

    index.html, browser.js, browser.css      the page (copied from assets/)
    data/index.js       window.JUMPSCOPE_INDEX = {meta, count, frequency, mean, max, top_token}
    data/vocab.js       window.JUMPSCOPE_VOCAB = [token string per id]     (when the model is known)
    data/shard_NNNNN.js jumpscopeShard(N, [latent, ...]) for latents [N*S, (N+1)*S), loaded on demand
    features.json       the meta record (what was scanned, with which settings, how long it took)

Data files are scripts, not JSON, because browsers refuse fetch() on file:// pages. A latent in a shard:
    {"i": id, "scale": max activation, "top": [context...], "bands": [band...],
     "hist": [upper end of the range, [counts of its equal bins from 0, empty top bins cut], bins],
     "up": [[token ids], [logit-lens values]], "down": ...}
    context: {"a": activation at "p", "s": sequence index in the cache, "p": position, "o": position
              of the first token shown, "t": [token ids], "v": [activations as thousandths of scale]}
    band:    {"q": [lower, upper quantile], "lo": activation, "hi": activation, "x": [context...]}
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .collect import CollectedFeatures
from .logit_lens import LogitLens

ASSETS = Path(__file__).parent / "assets"
PAGE_FILES = ("index.html", "browser.js", "browser.css")
MARKER = "features.json"
QUANT = 1000          # window activations are stored as integer thousandths of the latent's max


def rounded(values: np.ndarray, digits: int = 4):
    """values (any shape) as nested lists of floats with `digits` significant digits, so that the data
    files stay small: each is the double nearest the rounded decimal, which prints as that decimal.
    Non-finite values become 0."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    e = np.floor(np.log10(np.where(v == 0, 1.0, np.abs(v)))).astype(np.int64) - (digits - 1)
    up = np.power(10.0, np.clip(-e, 0, 300))                # exact powers of ten for e < 0 ...
    down = np.power(10.0, np.clip(e, 0, 300))              # ... and for e >= 0
    r = np.where(e < 0, np.rint(v * up) / up, np.rint(v / down) * down)
    return r.tolist()


class SiteWriter:
    def __init__(self, stats: CollectedFeatures, tokens: np.ndarray, sequence_ids: np.ndarray,
                 lens: Optional[LogitLens], quantiles: list[float], samples_per_band: int):
        """tokens [n_fed, T]: the token ids of the sequences in the order they were fed to the
        collector; sequence_ids [n_fed]: their indices in the cache."""
        self.stats, self.tokens, self.lens = stats, tokens, lens
        self.sequence_ids = [int(v) for v in np.asarray(sequence_ids).tolist()]
        self.quantiles, self.samples_per_band = [float(q) for q in quantiles], int(samples_per_band)
        if sorted(self.quantiles) != self.quantiles or not (0 <= self.quantiles[0] and self.quantiles[-1] <= 1):
            raise ValueError(f"quantiles must rise from >= 0 to <= 1, got {quantiles}")
        self.T = tokens.shape[1]
        self.offsets = np.arange(-stats.before, stats.after + 1)

    def _contexts(self, act, seq, pos, window, scale, valid) -> list[list[Optional[dict]]]:
        """Contexts of a block of latents: act, seq, pos, valid [L, k], window [L, k, win], scale [L]
        (numpy); None for the slots that are not valid."""
        at = pos[..., None] + self.offsets                                   # [L, k, win]
        ids = self.tokens[seq[..., None], np.clip(at, 0, self.T - 1)].tolist()
        safe = np.where(scale > 0, scale, 1.0)[:, None, None]
        q = np.rint(window.astype(np.float64) / safe * QUANT).astype(np.int64).tolist()
        first = np.maximum(0, self.stats.before - pos).tolist()
        stop = (len(self.offsets) - np.maximum(0, pos + self.stats.after + 1 - self.T)).tolist()
        act, seq, pos, valid = rounded(act), seq.tolist(), pos.tolist(), valid.tolist()
        before, ids_of = self.stats.before, self.sequence_ids
        out = []
        for l in range(len(act)):
            row = [None] * len(act[l])
            for j, ok in enumerate(valid[l]):
                if ok:
                    a, b = first[l][j], stop[l][j]
                    row[j] = {"a": act[l][j], "s": ids_of[seq[l][j]], "p": pos[l][j], "o": pos[l][j] - before + a,
                              "t": ids[l][j][a:b], "v": q[l][j][a:b]}
            out.append(row)
        return out

    def _band_picks(self, order: list[int], m: int) -> list[tuple]:
        """(quantile pair, lowest slot, highest slot, picked slots) of each band of one latent, from its
        m valid sample slots sorted by activation (`order`)."""
        picks = []
        for q_lo, q_hi in zip(self.quantiles[:-1], self.quantiles[1:]):
            lo_r, hi_r = int(math.floor(q_lo * m)), min(m, int(math.floor(q_hi * m)))
            if hi_r <= lo_r:
                continue
            n = min(self.samples_per_band, hi_r - lo_r)
            ranks = sorted({lo_r + (j * (hi_r - lo_r)) // n for j in range(n)})
            picks.append(([q_lo, q_hi], order[lo_r], order[hi_r - 1], [order[r] for r in ranks]))
        return picks

    def latents(self, lo: int, hi: int) -> list[dict]:
        """The shard entries of latents [lo, hi)."""
        st = self.stats
        sl = slice(lo, hi)
        scale = st.max[sl].double().numpy()
        top_valid = (st.top_key[sl] > float("-inf")).numpy()
        tops = self._contexts(st.top_key[sl].numpy(), st.top_seq[sl].numpy(), st.top_pos[sl].numpy(),
                              st.top_window[sl].float().numpy(), scale, top_valid)
        sample_act = st.sample_act[sl].numpy()
        sample_valid = (st.sample_key[sl] > float("-inf")).numpy()
        samples = self._contexts(sample_act, st.sample_seq[sl].numpy(), st.sample_pos[sl].numpy(),
                                 st.sample_window[sl].float().numpy(), scale, sample_valid)
        sample_order = np.argsort(np.where(sample_valid, sample_act, np.inf), axis=1, kind="stable").tolist()
        n_sampled = sample_valid.sum(1).tolist()
        sample_r = rounded(sample_act)
        counts = st.hist_counts[sl].numpy()
        used = (counts.shape[1] - np.argmax(counts[:, ::-1] > 0, axis=1)).tolist()
        counts, ranges, fired, scale_r = counts.tolist(), rounded(st.hist_range[sl].numpy()), st.count[sl].tolist(), rounded(scale)
        if self.lens is not None:
            L = self.lens
            up_ids, up_v = L.top_ids[sl].tolist(), rounded(L.top_values[sl].numpy())
            down_ids, down_v = L.bottom_ids[sl].tolist(), rounded(L.bottom_values[sl].numpy())
        out = []
        for l, i in enumerate(range(lo, hi)):
            entry = {"i": i, "scale": scale_r[l]}
            if fired[l] > 0:
                entry["top"] = [c for c in tops[l] if c is not None]
                entry["bands"] = [{"q": q, "lo": sample_r[l][a], "hi": sample_r[l][b], "x": [samples[l][j] for j in picked]}
                                  for q, a, b, picked in self._band_picks(sample_order[l], n_sampled[l])]
                entry["hist"] = [ranges[l], counts[l][:used[l]], len(counts[l])]
            if self.lens is not None:
                entry["up"], entry["down"] = [up_ids[l], up_v[l]], [down_ids[l], down_v[l]]
            out.append(entry)
        return out

    def index(self, meta: dict) -> dict:
        st = self.stats
        data = {"meta": meta, "count": st.count.tolist(), "frequency": rounded(st.frequency.numpy()),
                "mean": rounded(st.mean.numpy()), "max": rounded(st.max.numpy())}
        if self.lens is not None:
            data["top_token"] = self.lens.top_ids[:, 0].tolist()
        return data


def _script(path: Path, prefix: str, payload, suffix: str = ";") -> None:
    path.write_text(prefix + json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
                    + suffix + "\n", encoding="utf-8")


def write_site(folder: Path, writer: SiteWriter, meta: dict, vocab: Optional[list[str]], shard_latents: int,
               progress: bool = True) -> dict:
    """Write the page and its data into `folder` (which must exist and be empty); returns the meta
    record the page got (for `write_marker`)."""
    data = folder / "data"
    data.mkdir()
    W = writer.stats.count.numel()
    n_shards = -(-W // shard_latents)
    meta = {**meta, "shard_latents": int(shard_latents), "n_shards": n_shards, "quant": QUANT,
            "has_vocab": vocab is not None, "has_logit_lens": writer.lens is not None}
    for name in PAGE_FILES:
        shutil.copyfile(ASSETS / name, folder / name)
    if vocab is not None:
        _script(data / "vocab.js", "window.JUMPSCOPE_VOCAB=", vocab)
    for k in tqdm(range(n_shards), desc="features: writing shards", unit="shard", disable=not progress):
        lo, hi = k * shard_latents, min(W, (k + 1) * shard_latents)
        _script(data / f"shard_{k:05d}.js", f"jumpscopeShard({k},", writer.latents(lo, hi), ");")
    _script(data / "index.js", "window.JUMPSCOPE_INDEX=", writer.index(meta))
    return meta


def write_marker(folder: Path, meta: dict) -> None:
    (folder / MARKER).write_text(json.dumps(meta, indent=1) + "\n")

"""Synthetic activation caches with known features, for measuring how well a trainer recovers them.

x = sum_i a_i f_i + noise, with unit-norm true directions f_i (rows of `true_features.npy`, written
beside the cache) and sparse non-negative coefficients a_i. A regime sets how the coefficients are
drawn:
- frequency: `uniform` (every feature equally often) or `power_law` (feature of rank r fires with
  probability proportional to r^-exponent, as word and feature frequencies do);
- correlation: `none` (independent) or `groups` (features come in groups of `group_size`; a token
  first draws which groups are on, then each member of an active group fires with `within_group`);
- magnitude: `uniform` (in [1, 2]) or `lognormal` (each feature has its own scale, spread
  `magnitude_spread` in log space, times a per-activation factor in [0.5, 1.5]);
- n_features against d: many more features than dimensions is superposition.

The cache is format version 1 (shared/DESIGN.md), written a chunk at a time, so the trainer and the
evaluation read it like any harvest: `tokens` (random ids, BOS at each sequence's first position),
`layer_0/resid_post` (bf16 bits), `complete`, and the array's `mean_squared_norm` over non-BOS rows;
plus the array `true_features` [n_features, d] and the regime in the group attribute `synthetic`.
Deterministic for its seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

LAYER, SUBLAYER = 0, "resid_post"
FEATURES_ARRAY = "true_features"
BOS = 2


@dataclass
class Regime:
    name: str = "basic"
    d: int = 64
    n_features: int = 256
    active_per_token: float = 4.0        # expected number of active features per token
    frequency: str = "uniform"           # uniform | power_law
    power_law_exponent: float = 1.0
    correlation: str = "none"            # none | groups
    group_size: int = 4
    within_group: float = 0.5            # P(member fires | its group is on)
    magnitude: str = "uniform"           # uniform | lognormal
    magnitude_spread: float = 1.0
    noise: float = 0.0                   # std of isotropic Gaussian noise per dimension
    seed: int = 0

    def validate(self) -> None:
        choices = {"frequency": ("uniform", "power_law"), "correlation": ("none", "groups"),
                   "magnitude": ("uniform", "lognormal")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"regime {self.name}: {key}={getattr(self, key)!r}; choose {', '.join(allowed)}")
        if self.correlation == "groups" and self.n_features % self.group_size:
            raise ValueError(f"regime {self.name}: n_features must be a multiple of group_size")
        if not 0 < self.active_per_token < self.n_features:
            raise ValueError(f"regime {self.name}: active_per_token must be in (0, n_features)")


class SyntheticSource:
    """Draws tokens' coefficients for one regime; `sample(n, rng)` -> (x [n, d], coefficients [n, F])."""

    def __init__(self, regime: Regime):
        regime.validate()
        self.regime = r = regime
        rng = np.random.default_rng([r.seed, 0])
        f = rng.standard_normal((r.n_features, r.d))
        self.features = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        if r.frequency == "uniform":
            weight = np.ones(r.n_features)
        else:
            weight = np.arange(1, r.n_features + 1, dtype=np.float64) ** -r.power_law_exponent
            weight = weight[rng.permutation(r.n_features)]       # rank is not feature index
        self.p_fire = np.minimum(weight / weight.sum() * r.active_per_token, 1.0)
        if r.correlation == "groups":
            # P(group on) so that each feature keeps its marginal rate p_fire on average over its group
            g = self.p_fire.reshape(-1, r.group_size).mean(1)
            self.p_group = np.minimum(g / r.within_group, 1.0)
        self.scale = (np.exp(r.magnitude_spread * rng.standard_normal(r.n_features))
                      if r.magnitude == "lognormal" else np.ones(r.n_features))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        r = self.regime
        if r.correlation == "groups":
            groups_on = rng.random((n, len(self.p_group))) < self.p_group
            on = np.repeat(groups_on, r.group_size, axis=1) & (rng.random((n, r.n_features), dtype=np.float32) < r.within_group)
        else:
            on = rng.random((n, r.n_features), dtype=np.float32) < self.p_fire
        if r.magnitude == "uniform":
            mags = rng.uniform(1.0, 2.0, size=(n, r.n_features))
        else:
            mags = self.scale * rng.uniform(0.5, 1.5, size=(n, r.n_features))
        coeff = (mags * on).astype(np.float32)
        x = coeff @ self.features
        if r.noise:
            x += (r.noise * rng.standard_normal(x.shape)).astype(np.float32)
        return x.astype(np.float32), coeff


def write_synthetic_cache(path: Path, regime: Regime, n_tokens: int, context_length: int = 128,
                          chunk_rows: int = 8192, progress: bool = True) -> Path:
    """Write (or find already written, for the same regime and size) a synthetic cache at `path`."""
    import zarr
    path = Path(path)
    identity = {"regime": asdict(regime), "n_tokens": int(n_tokens), "context_length": context_length,
                "chunk_rows": chunk_rows}
    if (path / "zarr.json").exists():
        group = zarr.open_group(str(path), mode="r+")
        if dict(group.attrs).get("synthetic") == identity and all(group["complete"][:]):
            if FEATURES_ARRAY not in group:       # written before the features were kept in the group
                group.create_array(FEATURES_ARRAY, data=SyntheticSource(regime).features, compressors=None)
            return path
        raise FileExistsError(f"{path} holds another cache; remove it or choose another path")
    if n_tokens % chunk_rows or chunk_rows % context_length:
        raise ValueError("n_tokens must be a multiple of chunk_rows, and chunk_rows of context_length")
    source = SyntheticSource(regime)
    n_chunks = n_tokens // chunk_rows
    group = zarr.open_group(str(path), mode="w")
    cfg = {"write_empty_chunks": True}
    tokens = group.create_array("tokens", shape=(n_tokens,), chunks=(chunk_rows,), dtype="int32",
                                compressors=None, fill_value=0, config=cfg)
    acts = group.create_array(f"layer_{LAYER}/{SUBLAYER}", shape=(n_tokens, regime.d), chunks=(chunk_rows, regime.d),
                              dtype="uint16", compressors=None, fill_value=0, config=cfg,
                              attributes={"storage_dtype": "bfloat16"})
    complete = group.create_array("complete", shape=(n_chunks,), chunks=(1,), dtype="bool", compressors=None,
                                  fill_value=False, config=cfg)
    sq_sum, rows = 0.0, 0
    for c in tqdm(range(n_chunks), desc=f"synthetic {regime.name}", unit="chunk", disable=not progress):
        rng = np.random.default_rng([regime.seed, 1, c])
        x, _ = source.sample(chunk_rows, rng)
        stored = torch.from_numpy(x).to(torch.bfloat16)
        tok = rng.integers(BOS + 1, 4096, size=chunk_rows, dtype=np.int32)
        tok[::context_length] = BOS
        not_bos = tok != BOS
        sq_sum += float(stored.double().pow(2).sum(-1)[torch.from_numpy(not_bos)].sum())
        rows += int(not_bos.sum())
        acts[c * chunk_rows:(c + 1) * chunk_rows] = stored.view(torch.int16).numpy().view(np.uint16)
        tokens[c * chunk_rows:(c + 1) * chunk_rows] = tok
        complete[c] = True
    acts.attrs["mean_squared_norm"] = sq_sum / rows
    acts.attrs["statistics_rows"] = rows
    group.attrs.update({"format_version": 1, "context_length": context_length, "chunk_rows": chunk_rows,
                        "n_tokens": int(n_tokens), "bos_token_id": BOS, "storage_dtype": "bfloat16",
                        "model": {"id": "synthetic"}, "data": {"source": "quality/synthetic.py"},
                        "harvest_config": {}, "synthetic": identity})
    group.create_array(FEATURES_ARRAY, data=source.features, compressors=None)
    return path


def true_features(path) -> np.ndarray:
    import zarr
    return np.asarray(zarr.open_group(str(path), mode="r")[FEATURES_ARRAY][:])

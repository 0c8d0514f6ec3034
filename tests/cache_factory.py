"""Write format-version-1 caches (shared/DESIGN.md, "The cache") from given activations, for tests.

Independent of `harvest`, so the trainer can be tested against the format alone. Usage:

    write_cache(tmp_path / "cache", {(2, "mlp_out"): acts}, context_length=16, chunk_rows=64)

`acts` is a float numpy array or torch tensor of shape [n_tokens, width]; it is stored as bf16 bits
(uint16, attribute storage_dtype "bfloat16") or float32. Chunks listed in `incomplete` are left
unwritten and `complete[c]` False, as a killed harvest leaves them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr


def to_stored(acts, storage_dtype: str) -> np.ndarray:
    t = torch.as_tensor(np.asarray(acts, dtype=np.float32) if not isinstance(acts, torch.Tensor) else acts)
    if storage_dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if storage_dtype == "float32":
        return t.to(torch.float32).contiguous().numpy()
    raise ValueError(storage_dtype)


def stored_as_float(acts, storage_dtype: str) -> np.ndarray:
    """The float32 values the cache holds for `acts` after rounding to storage_dtype."""
    stored = to_stored(acts, storage_dtype)
    if storage_dtype == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).float().numpy()
    return stored


def write_cache(path, activations: dict, *, context_length: int, chunk_rows: int, tokens=None,
                bos_token_id: int = 2, vocab_size: int = 256, storage_dtype: str = "bfloat16",
                incomplete=(), format_version: int = 1, write_mean_squared_norm: bool = True,
                mean_squared_norm: float | None = None, codec: str | None = None, seed: int = 0) -> Path:
    """mean_squared_norm: the attribute to write (default: computed from the complete non-BOS rows).
    codec: None (raw chunk files, the format's default) or "zstd" (level 1) for activation arrays."""
    path = Path(path)
    n_tokens = len(next(iter(activations.values())))
    assert n_tokens % chunk_rows == 0 and chunk_rows % context_length == 0
    n_chunks = n_tokens // chunk_rows
    if tokens is None:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(bos_token_id + 1, vocab_size, size=n_tokens, dtype=np.int32)
    tokens = np.asarray(tokens, dtype=np.int32).copy()
    tokens[::context_length] = bos_token_id
    incomplete = set(int(c) for c in incomplete)
    written = np.array([c not in incomplete for c in range(n_chunks)])
    row_written = np.repeat(written, chunk_rows)
    not_bos = np.arange(n_tokens) % context_length != 0

    group = zarr.open_group(str(path), mode="w")
    group.attrs.update({
        "format_version": format_version, "context_length": context_length, "chunk_rows": chunk_rows,
        "n_tokens": n_tokens, "bos_token_id": bos_token_id, "storage_dtype": storage_dtype,
        "model": {"id": "synthetic", "revision": "test"}, "data": {"source": "tests/cache_factory.py"},
        "harvest_config": {}, "software_version": "test"})
    cfg = {"write_empty_chunks": True}
    tok = group.create_array("tokens", shape=(n_tokens,), chunks=(chunk_rows,), dtype="int32",
                             compressors=None, fill_value=0, config=cfg)
    for (layer, sublayer), acts in activations.items():
        stored = to_stored(acts, storage_dtype)
        assert stored.shape[0] == n_tokens
        values = stored_as_float(acts, storage_dtype).astype(np.float64)
        attrs = {"storage_dtype": storage_dtype}
        if write_mean_squared_norm:
            rows = values[not_bos & row_written] if written.any() else values[not_bos]
            attrs["mean_squared_norm"] = (float((rows ** 2).sum(-1).mean()) if mean_squared_norm is None
                                          else float(mean_squared_norm))
        compressors = None if codec is None else {"zstd": zarr.codecs.ZstdCodec(level=1)}[codec]
        arr = group.create_array(f"layer_{layer}/{sublayer}", shape=stored.shape,
                                 chunks=(chunk_rows, stored.shape[1]), dtype=stored.dtype,
                                 compressors=compressors, fill_value=0, config=cfg, attributes=attrs)
        for c in range(n_chunks):
            if written[c]:
                arr[c * chunk_rows:(c + 1) * chunk_rows] = stored[c * chunk_rows:(c + 1) * chunk_rows]
    for c in range(n_chunks):
        if written[c]:
            tok[c * chunk_rows:(c + 1) * chunk_rows] = tokens[c * chunk_rows:(c + 1) * chunk_rows]
    complete = group.create_array("complete", shape=(n_chunks,), chunks=(1,), dtype="bool",
                                  compressors=None, fill_value=False, config=cfg)
    complete[:] = written
    return path


def sparse_feature_activations(n_tokens: int, d: int, n_features: int, active: float, seed: int = 0,
                               noise: float = 0.0):
    """Synthetic activations x = sum of a few unit-norm true features with positive magnitudes.

    Each token has on average `active` features on (independently, probability active / n_features),
    magnitudes uniform in [1, 2]. Returns (x [n_tokens, d] float32, features [n_features, d], on mask).
    """
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n_features, d))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    on = rng.random((n_tokens, n_features)) < active / n_features
    mags = rng.uniform(1.0, 2.0, size=(n_tokens, n_features)) * on
    x = mags @ features + noise * rng.standard_normal((n_tokens, d))
    return x.astype(np.float32), features.astype(np.float32), on

"""Read one harvest's Zarr cache through its format (shared/DESIGN.md, "The cache", version 1) alone.

`train` never imports `harvest`: everything here follows from the format, so any writer that follows
it (the tests' `cache_factory`, another tool) is readable.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

from . import object_store
from .scatter_read import ScatterPlan, run_scatter, scatter_read

FORMAT_VERSION = 1
SUBLAYERS = ("resid_pre", "attn_z", "attn_out", "resid_mid", "mlp_out", "resid_post")
STORAGE_DTYPES = {"bfloat16": (np.uint16, torch.bfloat16), "float32": (np.float32, torch.float32)}


class CacheError(ValueError):
    """The cache cannot serve what was asked (missing array, newer format, no complete chunk...)."""


def open_cache(path) -> zarr.Group:
    """The cache's group, read-only: `path` is a local folder or an object-store URL (s3://, gs://)."""
    if object_store.is_url(path):
        group = _open_remote_group(str(path))
    else:
        path = Path(path)
        if not path.exists():
            raise CacheError(f"no cache at {str(path)!r}")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as e:  # zarr raises several types for "not a group"
            raise CacheError(f"{str(path)!r} is not a Zarr group: {e}") from e
    version = group.attrs.get("format_version")
    if version is None:
        raise CacheError(f"{str(path)!r} has no `format_version` attribute: not a jumpscope cache")
    if int(version) > FORMAT_VERSION:
        raise CacheError(f"cache {str(path)!r} was written in format version {version}; this trainer reads "
                         f"version {FORMAT_VERSION} and older. Update jumpscope to train on it.")
    for key in ("context_length", "chunk_rows", "n_tokens", "bos_token_id"):
        if key not in group.attrs:
            raise CacheError(f"cache {str(path)!r} lacks the group attribute {key!r}")
    return group


def _open_remote_group(url: str) -> zarr.Group:
    from zarr.storage import ObjectStore
    try:
        store = object_store.open_object_store(url)
    except ImportError:
        raise CacheError(f"cache {url!r} is in an object store, which needs obstore: "
                         "pip install -e '.[s3]' (make installs it when CACHE is a URL)") from None
    except Exception as e:
        raise CacheError(f"cannot open {url!r}: {e}") from e
    import obstore
    try:      # a listing names a missing bucket or bad credentials, where a missing key cannot
        top = obstore.list_with_delimiter(store)
    except Exception as e:
        raise CacheError(object_store.store_error_message(e, f"reading {url}")) from e
    if not any(o["path"].rsplit("/", 1)[-1] == "zarr.json" for o in top["objects"]):
        raise CacheError(f"no cache at {url!r} (no zarr.json under that prefix)")
    try:
        return zarr.open_group(store=ObjectStore(store, read_only=True), mode="r")
    except Exception as e:
        raise CacheError(object_store.store_error_message(e, f"{url!r} is not a Zarr group")) from e


def cache_identifier(path) -> str:
    """How a run names its cache: the absolute local path, or the URL."""
    return object_store.normalise_url(str(path)) if object_store.is_url(path) else str(Path(path).resolve())


def list_activation_arrays(group: zarr.Group) -> list[str]:
    """Every `layer_{L}/{sublayer}` array in the cache, sorted by layer then sublayer order."""
    names = []
    for layer_name, layer in group.groups():
        if not layer_name.startswith("layer_"):
            continue
        for sub_name, _ in layer.arrays():
            names.append(f"{layer_name}/{sub_name}")

    def key(name):
        layer, sub = name.split("/")
        return (int(layer[6:]) if layer[6:].isdigit() else math.inf,
                SUBLAYERS.index(sub) if sub in SUBLAYERS else len(SUBLAYERS), sub)
    return sorted(names, key=key)


def resolve_array_name(layer: int, sublayer: str) -> str:
    """resid_pre of layer L > 0 is stored once, as resid_post of layer L-1."""
    if sublayer == "resid_pre" and layer > 0:
        return f"layer_{layer - 1}/resid_post"
    return f"layer_{layer}/{sublayer}"


@dataclass
class ActivationArray:
    """One `layer_{L}/{sublayer}` array and the group facts needed to read it chunk by chunk."""
    cache_path: str
    name: str
    array: zarr.Array
    tokens: zarr.Array
    context_length: int
    chunk_rows: int
    n_tokens: int
    bos_token_id: int
    storage_dtype: str
    complete: np.ndarray          # bool [n_chunks]; the only truth about which rows are on disk
    mean_squared_norm: float | None

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def n_chunks(self) -> int:
        return len(self.complete)

    @property
    def n_sequences(self) -> int:
        return self.n_tokens // self.context_length

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.storage_dtype][1]

    @property
    def numpy_dtype(self):
        return STORAGE_DTYPES[self.storage_dtype][0]

    raw_layout: bool = field(default=False)  # chunk files hold the bare little-endian array bytes
    remote: object_store.ObjectChunks | None = field(default=None)   # the chunk objects, in an object store

    def chunk_path(self, c: int) -> Path | None:
        """The file of chunk c in a local store (None for other stores)."""
        root = getattr(self.array.store, "root", None)
        if root is None:
            return None
        return Path(root) / self.array.path / self.array.metadata.chunk_key_encoding.encode_chunk_key((c, 0))

    def raw_chunk_path(self, c: int) -> Path | None:
        """The file of chunk c when it holds the chunk's bytes as they are (no codec but `bytes`, a
        local store, no sharding): then it can be read straight into a buffer. None otherwise.

        Raises CacheError when the file is missing or has the wrong size: zarr would read a missing
        chunk as zeros, and a chunk marked complete must never train on zeros silently."""
        if not self.raw_layout:
            return None
        path = self.chunk_path(c)
        want = self.chunk_rows * self.width * np.dtype(self.numpy_dtype).itemsize
        try:
            size = path.stat().st_size
        except OSError:
            size = None
        if size != want:
            raise self._damaged(c, path, "missing" if size is None else f"{size} bytes, expected {want}")
        return path

    def _damaged(self, c: int, path, what: str) -> CacheError:
        return CacheError(f"{self.cache_path}: chunk {c} of {self.name} is marked complete but its file {path} "
                          f"is {what}: the cache is damaged. `python -m harvest.verify {self.cache_path} --repair` "
                          "finds every damaged chunk and unflags it; the same harvest command then rewrites them.")

    def read_chunk_into(self, c: int, out: np.ndarray, slots: np.ndarray | None = None,
                        plan: ScatterPlan | None = None) -> None:
        """Chunk c into `out` (a C-contiguous [rows, width] buffer of the stored dtype): chunk row i to
        out[slots[i]], skipped where slots[i] < 0; slots=None: the whole chunk into out[:chunk_rows].
        `plan`: the same slots' ScatterPlan, made ahead (bare chunk files only).

        Bare chunk files are copied once, from the page cache straight to their destination rows
        (`scatter_read`); compressed ones are decoded by zarr and then scattered."""
        if slots is None:
            slots = np.arange(self.chunk_rows)
        path = self.raw_chunk_path(c)
        if path is not None:
            with open(path, "rb", buffering=0) as f:
                if run_scatter(f.fileno(), plan, out) if plan is not None else scatter_read(f.fileno(), slots, out):
                    return
        elif (local := self.chunk_path(c)) is not None and not local.exists():
            raise self._damaged(c, local, "missing")
        elif self.remote is not None and self._read_remote(c, out, slots):
            return
        keep = slots >= 0
        out[slots[keep]] = self.read_chunk_numpy(c)[keep]

    def _read_remote(self, c: int, out: np.ndarray, slots: np.ndarray) -> bool:
        """Chunk c from the object store (object_store.ObjectChunks); False: zarr decodes it."""
        where = f"{self.cache_path}/{self.remote.key(c)}"
        try:
            return self.remote.read_into(c, out, slots, self.chunk_rows)
        except FileNotFoundError:
            raise self._damaged(c, where, "missing") from None
        except ValueError as e:
            raise self._damaged(c, where, str(e)) from None
        except Exception as e:
            if object_store.is_store_error(e):
                raise CacheError(object_store.store_error_message(e, f"reading chunk {c} of {self.name} from "
                                                                     f"{self.cache_path}")) from e
            raise

    def read_chunk_numpy(self, c: int) -> np.ndarray:
        """Chunk c as stored: uint16 bf16 bits or float32, shape [chunk_rows, width]."""
        return self.array[c * self.chunk_rows:(c + 1) * self.chunk_rows]

    def as_tensor(self, stored: np.ndarray) -> torch.Tensor:
        """Stored numpy -> torch without a copy (bf16 bits are reinterpreted, losslessly)."""
        t = torch.from_numpy(stored)
        return t.view(torch.bfloat16) if self.storage_dtype == "bfloat16" else t

    def read_chunk(self, c: int) -> torch.Tensor:
        return self.as_tensor(self.read_chunk_numpy(c))

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.as_tensor(self.array[start:stop])

    def _sample_rows(self, max_chunks: int, seed: int):
        """The non-BOS rows of a random sample of complete chunks, a chunk at a time (float64)."""
        done = np.flatnonzero(self.complete)
        if len(done) == 0:
            raise CacheError(f"{self.name}: no complete chunk to estimate statistics from")
        keep = torch.arange(self.chunk_rows) % self.context_length != 0
        for c in np.random.default_rng(seed).permutation(done)[:max_chunks]:
            yield self.read_chunk(int(c)).double()[keep]

    def estimate_mean_squared_norm(self, max_chunks: int = 16, seed: int = 0) -> float:
        """Mean ||x||^2 over non-BOS rows of a sample of complete chunks (when the attribute is absent)."""
        total, count = 0.0, 0
        for x in self._sample_rows(max_chunks, seed):
            total += x.pow(2).sum().item()
            count += x.shape[0]
        return total / count

    def estimate_median_norm(self, max_chunks: int = 4, seed: int = 0) -> float:
        """Median ||x|| over non-BOS rows of a sample of complete chunks."""
        norms = torch.cat([x.norm(dim=1) for x in self._sample_rows(max_chunks, seed)])
        return float(norms.quantile(0.5))


def open_activations(cache_path, layer: int, sublayer: str) -> ActivationArray:
    """Open `layer_{layer}/{sublayer}` (resid_pre resolved); errors list what the cache holds."""
    group = open_cache(cache_path)
    attrs = group.attrs
    name = resolve_array_name(int(layer), sublayer)
    available = list_activation_arrays(group)
    if name not in available:
        asked = f"layer_{layer}/{sublayer}" + (f" (stored as {name})" if name != f"layer_{layer}/{sublayer}" else "")
        raise CacheError(f"cache {str(cache_path)!r} holds no {asked}. It holds: "
                         + (", ".join(available) if available else "no activation arrays"))
    array = group[name]
    ctx, rows, n_tokens = int(attrs["context_length"]), int(attrs["chunk_rows"]), int(attrs["n_tokens"])
    if rows % ctx:
        raise CacheError(f"chunk_rows {rows} is not a multiple of context_length {ctx}")
    if array.ndim != 2 or array.shape[0] != n_tokens:
        raise CacheError(f"{name} has shape {array.shape}, expected [n_tokens={n_tokens}, width]")
    if array.chunks[0] != rows:
        raise CacheError(f"{name} is chunked {array.chunks}, expected {rows} rows per chunk")
    storage = array.attrs.get("storage_dtype", attrs.get("storage_dtype"))
    if storage not in STORAGE_DTYPES:
        raise CacheError(f"{name}: unsupported storage_dtype {storage!r} (expected one of {list(STORAGE_DTYPES)})")
    if np.dtype(array.dtype) != np.dtype(STORAGE_DTYPES[storage][0]):
        raise CacheError(f"{name}: dtype {array.dtype} does not match storage_dtype {storage!r}")
    if "complete" not in group:
        raise CacheError(f"cache {str(cache_path)!r} has no `complete` array")
    complete = np.asarray(group["complete"][:], dtype=bool)
    if len(complete) != n_tokens // rows:
        raise CacheError(f"`complete` has {len(complete)} entries, expected n_tokens // chunk_rows = {n_tokens // rows}")
    msn = array.attrs.get("mean_squared_norm")
    remote = None
    if object_store.is_url(cache_path):
        cache_path = object_store.normalise_url(str(cache_path))
        remote = object_store.ObjectChunks(array.store.store, array.path, array.metadata, int(array.shape[1]),
                                           np.dtype(array.dtype).itemsize, _bare_chunks(array, rows))
    return ActivationArray(raw_layout=_has_raw_layout(array, rows), remote=remote,
                           cache_path=str(cache_path), name=name, array=array, tokens=group["tokens"],
                           context_length=ctx, chunk_rows=rows, n_tokens=n_tokens,
                           bos_token_id=int(attrs["bos_token_id"]), storage_dtype=storage,
                           complete=complete, mean_squared_norm=None if msn is None else float(msn))


def _has_raw_layout(array: zarr.Array, chunk_rows: int) -> bool:
    from zarr.storage import LocalStore
    return isinstance(array.store, LocalStore) and _bare_chunks(array, chunk_rows)


def _bare_chunks(array: zarr.Array, chunk_rows: int) -> bool:
    """Each chunk object holds the chunk's bytes as they are: no codec but `bytes`, no sharding."""
    try:
        from zarr.codecs import BytesCodec
        md = array.metadata
        return (sys.byteorder == "little"
                and len(md.codecs) == 1 and isinstance(md.codecs[0], BytesCodec)
                and getattr(md.codecs[0].endian, "value", md.codecs[0].endian) in ("little", None)
                and tuple(array.chunks) == (chunk_rows, array.shape[1]) and array.order == "C")
    except Exception:  # another zarr version or metadata layout: use zarr's own reads
        return False


HELDOUT_RULE = ("sorted(numpy.random.default_rng(seed).permutation(n_sequences)[:round(fraction * n_sequences)]), "
                "n_sequences = n_tokens // context_length over the whole cache, complete or not")


def heldout_sequences(n_sequences: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of the held-out sequences: never served for training, what evaluation uses.

    Sequence s covers rows [s * context_length, (s + 1) * context_length). Only those inside complete
    chunks hold data; `heldout_rows_available` gives those.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    count = int(round(fraction * n_sequences))
    return np.sort(np.random.default_rng(seed).permutation(n_sequences)[:count])


def heldout_sequences_of_cache(cache_path, heldout: dict) -> np.ndarray:
    """The held-out sequences of a run, from the `heldout` entry of its sae.json (or the train config)."""
    group = open_cache(cache_path)
    n_sequences = int(group.attrs["n_tokens"]) // int(group.attrs["context_length"])
    return heldout_sequences(n_sequences, float(heldout["fraction"]), int(heldout["seed"]))


def complete_heldout_sequences(source: ActivationArray, heldout: dict) -> np.ndarray:
    """The held-out sequences that lie in complete chunks (the ones that can be read)."""
    seqs = heldout_sequences(source.n_sequences, float(heldout["fraction"]), int(heldout["seed"]))
    chunk_of = seqs * source.context_length // source.chunk_rows
    return seqs[source.complete[chunk_of]]

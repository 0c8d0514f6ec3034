"""Text sources: the bundled corpus, local .txt/.jsonl/.parquet files, or a streamed hub dataset.

Each yields documents (strings) in an order fixed by the seed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

from .config import DataConfig

BUNDLED = Path(__file__).parent / "corpus" / "bundled.jsonl"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    pass


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
    else:
        raise DataError(f"data.path={str(path)!r} does not exist")
    bad = [f for f in files if f.suffix not in LOCAL_SUFFIXES]
    if bad or not files:
        raise DataError(f"data.path={str(path)!r}: expected .txt, .jsonl or .parquet files, found "
                        f"{[f.name for f in bad] or 'none'}")
    return files


def _read_file(f: Path, text_field: str) -> Iterator[str]:
    if f.suffix == ".txt":
        yield f.read_text(encoding="utf-8", errors="replace")
    elif f.suffix == ".jsonl":
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise DataError(f"{f}:{n}: no field {text_field!r} (set data.text_field)")
                    yield record[text_field]
    else:
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{f}: no column {text_field!r} (set data.text_field); "
                            f"columns: {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from batch.column(0).to_pylist()


def iter_documents(cfg: DataConfig, seed: int) -> Iterator[str]:
    if cfg.kind == "bundled":
        docs = [json.loads(line)["text"] for line in BUNDLED.open(encoding="utf-8")]
        random.Random(seed).shuffle(docs)
        yield from docs
    elif cfg.kind == "local":
        if not cfg.path:
            raise DataError("data=local needs data.path (DATA=<file or folder>)")
        files = _local_files(Path(cfg.path).expanduser())
        random.Random(seed).shuffle(files)
        for f in files:
            yield from _read_file(f, cfg.text_field)
    elif cfg.kind == "hub":
        if not cfg.dataset:
            raise DataError("data=hub needs data.dataset (DATA=<Hugging Face dataset id>)")
        import datasets
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=True)
        except Exception as e:
            raise DataError(f"cannot stream dataset {cfg.dataset!r}: {e}") from e
        for record in ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer):
            yield record[cfg.text_field]
    else:
        raise DataError(f"data.kind={cfg.kind!r}: choose bundled, local or hub")


def describe(cfg: DataConfig) -> dict:
    """Provenance of the data source, for the cache's attributes."""
    if cfg.kind == "bundled":
        import hashlib
        return {"kind": "bundled", "file": BUNDLED.name,
                "sha256": hashlib.sha256(BUNDLED.read_bytes()).hexdigest()}
    if cfg.kind == "local":
        return {"kind": "local", "path": str(Path(cfg.path).expanduser().resolve()),
                "text_field": cfg.text_field}
    return {"kind": "hub", "dataset": cfg.dataset, "subset": cfg.subset, "split": cfg.split,
            "text_field": cfg.text_field, "shuffle_buffer": cfg.shuffle_buffer}

"""Text sources and sequence packing."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest.config import DataConfig
from harvest.documents import DataError, iter_documents
from harvest.packing import iter_sequences
from harvest.tiny_model import TOKENIZER_FILE


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_local_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("alpha document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta one"}) + "\n\n" + json.dumps({"text": "beta two"}) + "\n")
    pq.write_table(pa.table({"text": ["gamma one", "gamma two"], "other": [1, 2]}), tmp_path / "c.parquet")
    docs = list(iter_documents(DataConfig(kind="local", path=str(tmp_path)), seed=0))
    assert sorted(docs) == sorted(["alpha document", "beta one", "beta two", "gamma one", "gamma two"])
    # another seed, another file order; the same seed, the same order
    orders = {tuple(iter_documents(DataConfig(kind="local", path=str(tmp_path)), seed=s)) for s in range(6)}
    assert len(orders) > 1
    assert list(iter_documents(DataConfig(kind="local", path=str(tmp_path)), seed=3)) == \
        list(iter_documents(DataConfig(kind="local", path=str(tmp_path)), seed=3))


def test_local_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(DataConfig(kind="local", path=str(tmp_path / "nope")), seed=0))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'"):
        list(iter_documents(DataConfig(kind="local", path=str(tmp_path / "x.jsonl")), seed=0))
    (tmp_path / "y.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="expected .txt, .jsonl or .parquet"):
        list(iter_documents(DataConfig(kind="local", path=str(tmp_path / "y.csv")), seed=0))


def test_hub_dataset_is_streamed_and_shuffled_with_the_seed(monkeypatch):
    import datasets
    calls = {}

    def fake_load_dataset(name, subset, split, streaming):
        calls.update(name=name, subset=subset, split=split, streaming=streaming)
        return datasets.IterableDataset.from_generator(
            lambda: ({"content": f"document {i}"} for i in range(50)))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(kind="hub", dataset="someone/corpus", subset="en", text_field="content", shuffle_buffer=16)
    a = list(iter_documents(cfg, seed=0))
    assert calls == {"name": "someone/corpus", "subset": "en", "split": "train", "streaming": True}
    assert sorted(a) == sorted(f"document {i}" for i in range(50)) and a != sorted(a, key=lambda s: int(s.split()[1]))
    assert list(iter_documents(cfg, seed=0)) == a
    assert list(iter_documents(cfg, seed=1)) != a


def test_sequences_start_with_bos_have_exact_length_and_keep_every_token(tokenizer):
    docs = [f"Document number {i} says {'hello world ' * (i % 7)}<bos> and ends." for i in range(40)]
    seqs = list(iter_sequences(docs, tokenizer, context_length=16, docs_per_batch=7))
    assert seqs and all(s.shape == (16,) and s.dtype == np.int32 for s in seqs)
    body = np.concatenate([s[1:] for s in seqs])
    assert all(s[0] == tokenizer.bos_token_id for s in seqs)
    assert (body != tokenizer.bos_token_id).all()             # BOS only at position 0
    # the packed stream is the documents' tokens joined by EOS, BOS ids dropped, in order
    stream = []
    for d in docs:
        stream += [t for t in tokenizer(d, add_special_tokens=False)["input_ids"] if t != tokenizer.bos_token_id]
        stream.append(tokenizer.eos_token_id)
    n = len(body)
    assert n == (len(stream) // 15) * 15
    np.testing.assert_array_equal(body, np.asarray(stream[:n]))


def test_bundled_corpus_packing_is_deterministic_per_seed(tokenizer):
    def first(seed, k=5):
        it = iter_sequences(iter_documents(DataConfig(kind="bundled"), seed), tokenizer, 64)
        return np.stack([next(it) for _ in range(k)])
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))

"""The embedded trained Gemma 2 (`make tiny-model`): its corpus, its deterministic and resumable
build, and what the shipped checkpoint must be (better than n-gram baselines on held-out text; its
sites matter) checked against computations written here."""
from __future__ import annotations

import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_gemma import CHECKPOINT
from tiny_gemma.corpus import Document, _sections, clean_rst, is_heldout, python_documents
from tiny_gemma.ngram import BigramCounts, bigram_cross_entropy, unigram_cross_entropy

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "harvest" / "corpus" / "bundled.jsonl"


# --- corpus -------------------------------------------------------------------------------------

def test_clean_rst_keeps_prose_and_code_drops_markup():
    page = """:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. moduleauthor:: Somebody <somebody@example.org>

.. index:: single: JSON

Use :func:`json.dumps` or :meth:`~json.JSONEncoder.encode` (see :pep:`8` and
:ref:`the tutorial <tut-json>`). Call ``loads`` on **text**::

   >>> json.loads('[1]')
   [1]

.. function:: dumps(obj)

   Serialize *obj*.

   .. versionadded:: 3.9

.. _label-here:

.. note::
   Keys are strings.
"""
    text = clean_rst(page)
    assert "json --- JSON encoder" in text and "=====" not in text
    assert "Use json.dumps or encode (see PEP 8 and\nthe tutorial)." in text
    assert "Call loads on text:" in text and "   >>> json.loads('[1]')" in text
    assert "dumps(obj)" in text and "New in version 3.9." in text and "Note:" in text
    for gone in ("module::", "synopsis", "Somebody", "index", "single: JSON", "_label-here", "``", "**", ":func:"):
        assert gone not in text, gone


def test_pages_split_at_their_top_two_heading_levels():
    page = "Title\n=====\n\nintro\n\nPart A\n------\n\na\n\nDetail\n~~~~~~\n\nd\n\nPart B\n------\n\nb\n"
    sections = _sections(page)
    assert [s.splitlines()[0] for s in sections] == ["Title", "Part A", "Part B"]
    assert "Detail" in sections[1]


def test_source_files_cut_at_top_level_statements(tmp_path):
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(60))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text('"""A module."""\nimport os\n\n\n' + body)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_mod.py").write_text("def test():\n    pass\n" * 50)
    docs = list(python_documents(tmp_path, ["test"], min_chars=50, max_chars=400))
    assert {d.name.split("#")[0] for d in docs} == {"stdlib/pkg/mod"}
    assert len(docs) > 3 and all(len(d.text) < 1000 for d in docs)
    assert all(d.text.startswith(('"""', "def ")) for d in docs)
    assert "".join(d.text for d in docs).count("def f") == 60


def test_heldout_split_is_by_name_alone():
    docs = [Document(f"docs/page{i}#{j}", "x") for i in range(400) for j in range(5)]
    held = {d.name for d in docs if is_heldout(d, 0.05)}
    assert 0.03 < len(held) / len(docs) < 0.07
    assert held == {d.name for d in reversed(docs) if is_heldout(Document(d.name, "other text"), 0.05)}


# --- n-gram baselines ---------------------------------------------------------------------------

def _kneser_ney_by_hand(train, test, V, d=0.75):
    pairs = Counter((int(a), int(b)) for s in train for a, b in zip(s[:-1], s[1:]))
    c_prev = Counter()
    after, before = Counter(), Counter()
    for (a, b), c in pairs.items():
        c_prev[a] += c
        after[a] += 1
        before[b] += 1
    n_types = len(pairs)
    total = 0.0
    n = 0
    for s in test:
        for a, b in zip(s[:-1], s[1:]):
            cont = (before[int(b)] + 1) / (n_types + V)
            if c_prev[int(a)]:
                p = max(pairs[(int(a), int(b))] - d, 0) / c_prev[int(a)] + d * after[int(a)] / c_prev[int(a)] * cont
            else:
                p = cont
            total -= math.log(p)
            n += 1
    return total / n


def test_ngram_baselines_match_a_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    V = 9
    train = rng.integers(0, V - 1, size=(40, 12))     # token V-1 never occurs in training
    test = rng.integers(0, V, size=(10, 12))
    counts = BigramCounts.from_sequences(train, V)
    assert bigram_cross_entropy(counts, test) == pytest.approx(_kneser_ney_by_hand(train, test, V), rel=1e-12)
    freq = np.bincount(train[:, 1:].reshape(-1), minlength=V)
    p = (freq + 1) / (freq.sum() + V)
    assert unigram_cross_entropy(counts, test) == pytest.approx(float(-np.log(p[test[:, 1:]]).mean()), rel=1e-12)
    counts.save(tmp_path)
    again = BigramCounts.load(tmp_path)
    assert again.vocab_size == V and np.array_equal(again.keys, counts.keys) and np.array_equal(again.counts, counts.counts)


# --- the build: deterministic, resumable --------------------------------------------------------

def _toy_sources(root: Path) -> tuple[Path, Path]:
    """A documentation folder of real prose (held-out documents of the shipped corpus, as pages) and
    a source folder of real modules (this interpreter's json package), with a test folder to skip."""
    docs = root / "docs"
    docs.mkdir(parents=True)
    records = [json.loads(line) for line in BUNDLED.open()][:24]
    for i, r in enumerate(records):
        (docs / f"page{i}.rst.txt").write_text(f"Page {i}\n{'=' * 10}\n\n{r['text']}\n")
    code = root / "lib"
    shutil.copytree(Path(json.__file__).parent, code / "json", ignore=shutil.ignore_patterns("__pycache__"))
    (code / "test").mkdir()
    (code / "test" / "test_skipped.py").write_text("SKIPPED_MARKER = 1\n" * 100)
    return docs, code


def _toy_config(tmp_path: Path, work: str, **train):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from tiny_gemma.config import SourcePackage, register_configs
    register_configs()
    overrides = [f"work_dir={tmp_path / work}", f"out={tmp_path / work / 'out'}",
                 f"bundled_out={tmp_path / work / 'bundled.jsonl'}", "vocab_size=384", "progress=false",
                 "architecture.hidden_size=32", "architecture.intermediate_size=64",
                 "architecture.num_hidden_layers=2", "architecture.num_attention_heads=2",
                 "architecture.num_key_value_heads=1", "architecture.head_dim=16",
                 "architecture.query_pre_attn_scalar=16", "architecture.sliding_window=16",
                 "train.context_length=32", "train.batch_sequences=4", "train.total_tokens=3072",
                 "train.warmup_steps=4", "train.eval_every_steps=8", "train.eval_sequences=8",
                 "train.checkpoint_every_steps=8", "ablation_sequences=8", "corpus.heldout_fraction=0.2",
                 *[f"train.{k}={v}" for k, v in train.items()]]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="tiny_gemma", overrides=overrides))
    docs, code = tmp_path / "src" / "docs", tmp_path / "src" / "lib"
    cfg.corpus.sources = [SourcePackage(package="docs", kind="sphinx_sources", root=".", deb=str(docs)),
                          SourcePackage(package="lib", kind="python_source", root=".", exclude=["test"], deb=str(code))]
    return cfg


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_build_is_deterministic_and_resumes_to_the_same_bits(tmp_path):
    from tiny_gemma.build import build
    _toy_sources(tmp_path / "src")
    whole = build(_toy_config(tmp_path, "whole"))
    assert whole is not None and whole["steps"] == 24
    out = tmp_path / "whole" / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "ngram_counts.npz", "README.md",
                 "loss.png", "build.json", "training_log.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # Stopped after 10 steps (a checkpoint at step 10, nothing shipped), then resumed.
    assert build(_toy_config(tmp_path, "resumed", max_steps_this_run=10)) is None
    assert not (tmp_path / "resumed" / "out").exists()
    resumed = build(_toy_config(tmp_path, "resumed"))
    a, b = _weights(out), _weights(tmp_path / "resumed" / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]   # noqa: E731
    logs = [[json.loads(x) for x in (f / "out" / "training_log.jsonl").read_text().splitlines()]
            for f in (tmp_path / "whole", tmp_path / "resumed")]
    assert strip(logs[0]) == strip(logs[1]) and len(logs[0]) == 3
    assert resumed["figures"] == whole["figures"] and resumed["corpus"]["sha256"] == whole["corpus"]["sha256"]

    # The held-out documents are the bundled corpus written beside it, and none was trained on.
    held = [json.loads(x) for x in (tmp_path / "whole" / "bundled.jsonl").read_text().splitlines()]
    assert len(held) == whole["corpus"]["heldout_documents"] > 0
    assert all(is_heldout(Document(r["name"], r["text"]), 0.2) for r in held)
    corpus_text = "\n".join(r["text"] for r in held)
    assert "SKIPPED_MARKER" not in corpus_text

    # A checkpoint of another build is refused rather than resumed.
    with pytest.raises(RuntimeError, match="another build"):
        build(_toy_config(tmp_path, "resumed", lr=1e-3, max_steps_this_run=1, total_tokens=6144))


def test_cli_reports_a_missing_source_without_traceback(tmp_path):
    import subprocess
    done = subprocess.run([sys.executable, "-m", "tiny_gemma", f"work_dir={tmp_path}", f"out={tmp_path}/o",
                           f"bundled_out={tmp_path}/b.jsonl", f"corpus.sources.0.deb={tmp_path}/missing.deb"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


# --- the shipped checkpoint ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    """The shipped model loaded as the harvester loads it, and the held-out sequences it was scored on."""
    from harvest.config import compose_harvest_config
    from harvest.model import load_model
    from tiny_gemma.build import pack
    loaded = load_model(compose_harvest_config([]).model, "cpu")
    meta = json.loads((CHECKPOINT / "build.json").read_text())
    texts = [json.loads(line)["text"] for line in BUNDLED.open()]
    seqs = pack(texts, loaded.tokenizer, meta["train"]["context_length"])
    return loaded.model, loaded.tokenizer, seqs, meta


@torch.no_grad()
def _cross_entropy(model, seqs, batch=64):
    total, n = 0.0, 0
    for i in range(0, len(seqs), batch):
        ids = torch.from_numpy(seqs[i:i + batch].astype(np.int64))
        logits = model(input_ids=ids).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        n += ids[:, 1:].numel()
    return total / n


def test_shipped_model_beats_unigram_and_bigram_on_heldout_text(shipped):
    model, tokenizer, seqs, meta = shipped
    assert meta["corpus"]["heldout_documents"] == len(BUNDLED.read_text().splitlines())
    assert meta["figures"]["heldout"]["predictions"] == seqs[:, 1:].size
    ce = _cross_entropy(model, seqs)
    counts = BigramCounts.load(CHECKPOINT)
    bigram, unigram = bigram_cross_entropy(counts, seqs), unigram_cross_entropy(counts, seqs)
    assert ce < bigram - 0.5 and bigram < unigram - 1.0, (ce, bigram, unigram)
    # The model card states what is measured here.
    assert meta["figures"]["heldout"]["model"] == pytest.approx(ce, abs=2e-4)
    assert meta["figures"]["heldout"]["bigram"] == pytest.approx(bigram, abs=1e-9)
    assert meta["figures"]["heldout"]["unigram"] == pytest.approx(unigram, abs=1e-9)
    assert f"**{ce:.3f}**" in (CHECKPOINT / "README.md").read_text()


def test_shipped_model_demo_site_matters(shipped):
    """Zero- and mean-ablating layer 2's MLP output (BOS untouched) raise held-out loss clearly;
    evaluate.delta_lm.site_ablation against a hook written here."""
    from evaluate.delta_lm import site_ablation
    model, tokenizer, seqs, _ = shipped
    ids = torch.from_numpy(seqs[:48].astype(np.int64))
    keep = ids != tokenizer.bos_token_id
    acts = {}
    norm = model.model.layers[2].post_feedforward_layernorm
    handle = norm.register_forward_hook(lambda m, a, o: acts.__setitem__("x", o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    mean = acts["x"][keep].double().mean(0).float()

    def ablated_ce(fill):
        h = norm.register_forward_hook(lambda m, a, o: torch.where(keep[..., None], fill(o), o))
        try:
            return _cross_entropy(model, seqs[:48])
        finally:
            h.remove()

    clean = _cross_entropy(model, seqs[:48])
    zero, mean_ce = ablated_ce(torch.zeros_like), ablated_ce(lambda o: mean.expand_as(o))
    got = site_ablation(model, ids, 2, "mlp_out", mean, tokenizer.bos_token_id, progress=False)
    assert got.ce_clean == pytest.approx(clean, abs=1e-5)
    assert got.ce_zero == pytest.approx(zero, abs=1e-5) and got.ce_mean == pytest.approx(mean_ce, abs=1e-5)
    assert zero > clean + 0.1 and mean_ce > clean + 0.05, (clean, zero, mean_ce)

"""`make tiny-model`: corpus -> tokenizer -> packed sequences -> trained model -> measured -> card.

Every stage's output is kept in work_dir, so a rerun after an interruption picks up where it stopped
(training resumes from its checkpoint). The shipped folder is replaced only once it is complete.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .card import loss_plot, write_card
from .config import TinyGemmaConfig
from .corpus import build_corpus, write_jsonl
from .lm_train import build_model, train_lm
from .measure import measure
from .ngram import BigramCounts
from .tokenizer import as_transformers, train_bpe

# Settings of a run that do not change its result.
RUNTIME_ONLY = ("max_steps_this_run", "eval_every_steps", "eval_sequences", "checkpoint_every_steps")


def pack(texts: list[str], tokenizer, context_length: int) -> np.ndarray:
    from harvest.packing import iter_sequences
    seqs = list(iter_sequences(texts, tokenizer, context_length))
    return np.stack(seqs).astype(np.int32) if seqs else np.empty((0, context_length), np.int32)


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build(cfg: TinyGemmaConfig) -> dict | None:
    """Build the model into cfg.out; returns the card's metadata, or None when training stopped early."""
    started = time.perf_counter()
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, sources = build_corpus(cfg.corpus, work / "sources")
    corpus_hash = corpus.sha256()
    print(f"[tiny-model] corpus {corpus_hash[:12]}: {corpus.stats()}")

    tok = train_bpe((d.text for d in corpus.train), cfg.vocab_size)
    tokenizer = as_transformers(tok)
    tok_hash = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    T = cfg.train.context_length
    packed = work / f"sequences-{fingerprint(corpus_hash, tok_hash, T, cfg.train.seed)}.npz"
    if packed.exists():
        with np.load(packed) as z:
            train_seqs, heldout_seqs = z["train"], z["heldout"]
    else:
        texts = [d.text for d in corpus.train]
        random.Random(cfg.train.seed).shuffle(texts)
        train_seqs = pack(texts, tokenizer, T)
        heldout_seqs = pack([d.text for d in corpus.heldout], tokenizer, T)
        tmp = packed.with_name(packed.stem + ".tmp.npz")
        np.savez(tmp, train=train_seqs, heldout=heldout_seqs)
        tmp.replace(packed)
    print(f"[tiny-model] {len(train_seqs):,} training and {len(heldout_seqs):,} held-out sequences of {T}")

    train_identity = {k: v for k, v in asdict(cfg.train).items() if k not in RUNTIME_ONLY}
    build_id = fingerprint(corpus_hash, tok_hash, cfg.vocab_size, dict(cfg.architecture), train_identity)
    model = build_model(cfg.vocab_size, dict(cfg.architecture), cfg.train.seed)
    log = train_lm(model, train_seqs, heldout_seqs, cfg.train, work, build_id, cfg.progress)
    steps = max(1, int(cfg.train.total_tokens) // (cfg.train.batch_sequences * T))
    if not log or log[-1]["step"] < steps:
        return None

    counts = BigramCounts.from_sequences(train_seqs, cfg.vocab_size)
    figures = measure(model, train_seqs, heldout_seqs, counts, tokenizer.bos_token_id,
                      cfg.ablation_sequences, cfg.train.seed, cfg.progress)
    meta = {
        "build_id": build_id,
        "architecture": dict(cfg.architecture), "vocab_size": cfg.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {**corpus.stats(), "sha256": corpus_hash, "sources": sources,
                   "heldout_fraction": cfg.corpus.heldout_fraction,
                   "train_tokens": int((train_seqs[:, 1:] != tokenizer.bos_token_id).sum()),
                   "heldout_tokens": int((heldout_seqs[:, 1:] != tokenizer.bos_token_id).sum())},
        "tokenizer_sha256": tok_hash,
        "train": asdict(cfg.train), "steps": steps,
        "epochs": steps * cfg.train.batch_sequences / len(train_seqs),
        "figures": figures,
        "build_seconds": time.perf_counter() - started,
        "training_seconds": log[-1]["seconds"],
    }

    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    counts.save(tmp)
    with (tmp / "training_log.jsonl").open("w") as f:
        for record in log:
            f.write(json.dumps(record) + "\n")
    loss_plot(log, figures, tmp / "loss.png")
    write_card(tmp, meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    write_jsonl(corpus.heldout, Path(cfg.bundled_out))
    print(f"[tiny-model] wrote {out} and {cfg.bundled_out}; held-out cross-entropy "
          f"{figures['heldout']['model']:.3f} (bigram {figures['heldout']['bigram']:.3f}, "
          f"unigram {figures['heldout']['unigram']:.3f})")
    return meta

"""Next-token training of the embedded Gemma 2 on CPU: deterministic for its seed and thread count,
resumable from its checkpoint with the same bits as an uninterrupted run.

Batches are whole packed sequences (harvest.packing: BOS, then the documents joined by EOS), the
same shape of input the harvester later feeds the model. Step s takes sequences [s*B, (s+1)*B) of
a stream of per-epoch permutations, so the data order depends only on the seed and the step.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import LMTrainConfig


def build_model(vocab_size: int, architecture: dict, seed: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                          attn_implementation="eager", **architecture)
    return Gemma2ForCausalLM(config).to(torch.float32)


def batch_indices(step: int, batch: int, n_sequences: int, seed: int) -> np.ndarray:
    """Sequences of step `step`: positions [step*batch, (step+1)*batch) of the stream of epoch
    permutations (an epoch's permutation depends only on the seed and the epoch)."""
    start, stop = step * batch, (step + 1) * batch
    out = []
    for epoch in range(start // n_sequences, (stop - 1) // n_sequences + 1):
        perm = np.random.default_rng([seed, epoch]).permutation(n_sequences)
        lo, hi = max(start - epoch * n_sequences, 0), min(stop - epoch * n_sequences, n_sequences)
        out.append(perm[lo:hi])
    return np.concatenate(out)


def learning_rate(step: int, total: int, cfg: LMTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    floor = cfg.min_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def next_token_loss(model, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def cross_entropy(model, sequences: np.ndarray, batch: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over every prediction of `sequences` [n, T]."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(sequences), batch):
        ids = torch.from_numpy(np.asarray(sequences[i:i + batch], dtype=np.int64))
        total += float(next_token_loss(model, ids, reduction="sum").double())
        n += ids.shape[0] * (ids.shape[1] - 1)
    return total / n


def _optimizer(model, cfg: LMTrainConfig):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def train_lm(model, train_seqs: np.ndarray, heldout_seqs: np.ndarray, cfg: LMTrainConfig,
             work: Path, fingerprint: str, progress: bool = True) -> list[dict]:
    """Train `model` in place; returns the log (one record per evaluation). Checkpoints go to
    work/lm_checkpoint.pt; a checkpoint of another fingerprint (corpus, tokenizer, config) is refused."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    B, T = cfg.batch_sequences, cfg.context_length
    if train_seqs.shape[1] != T:
        raise ValueError(f"training sequences are {train_seqs.shape[1]} long, context_length is {T}")
    total = max(1, int(cfg.total_tokens) // (B * T))
    opt = _optimizer(model, cfg)
    ckpt_path = Path(work) / "lm_checkpoint.pt"
    step, log, seconds_before = 0, [], 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise RuntimeError(f"{ckpt_path} belongs to another build (corpus, tokenizer or config "
                               f"changed); delete it to start afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, log, seconds_before = state["step"], state["log"], state.get("seconds", 0.0)
        print(f"[tiny-model] resuming at step {step} of {total}")

    def checkpoint():
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "step": step, "log": log, "config": asdict(cfg),
                    "seconds": seconds_before + time.perf_counter() - started}, tmp)
        os.replace(tmp, ckpt_path)

    eval_seqs = heldout_seqs[:cfg.eval_sequences]
    train_probe = train_seqs[np.random.default_rng([cfg.seed, 10**6]).permutation(len(train_seqs))[:len(eval_seqs)]]
    started, this_run = time.perf_counter(), 0   # `started` before checkpoint() is first called
    bar = tqdm(total=total, initial=step, desc="tiny-model", unit="step", disable=not progress)
    while step < total:
        model.train()
        lr = learning_rate(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = torch.from_numpy(train_seqs[batch_indices(step, B, len(train_seqs), cfg.seed)].astype(np.int64))
        loss = next_token_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        this_run += 1
        bar.update(1)
        if step % cfg.eval_every_steps == 0 or step == total:
            record = {"step": step, "tokens": step * B * T, "lr": lr, "batch_loss": loss.item(),
                      "train_ce": cross_entropy(model, train_probe), "heldout_ce": cross_entropy(model, eval_seqs),
                      "seconds": round(seconds_before + time.perf_counter() - started, 1)}
            log.append(record)
            bar.set_postfix(train=f"{record['train_ce']:.3f}", heldout=f"{record['heldout_ce']:.3f}")
            if not progress:
                print(f"[tiny-model] step {step}/{total}: train {record['train_ce']:.3f}, "
                      f"held-out {record['heldout_ce']:.3f} nats, {record['seconds']:.0f} s", flush=True)
        if (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0) or step == total:
            checkpoint()
        if cfg.max_steps_this_run and this_run >= cfg.max_steps_this_run and step < total:
            checkpoint()
            bar.close()
            print(f"[tiny-model] stopped at step {step} of {total} (max_steps_this_run); rerun to resume")
            return log
    bar.close()
    return log

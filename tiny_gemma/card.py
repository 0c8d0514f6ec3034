"""The model card (README.md beside the weights) and its loss plot."""
from __future__ import annotations

import json
from pathlib import Path


def loss_plot(log: list[dict], figures: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tokens = [r["tokens"] / 1e6 for r in log]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(tokens, [r["train_ce"] for r in log], label="train (sample of sequences)")
    ax.plot(tokens, [r["heldout_ce"] for r in log], label="held-out documents")
    for name, style in (("unigram", ":"), ("bigram", "--")):
        ax.axhline(figures["heldout"][name], color="grey", linestyle=style, label=f"{name} model, held-out")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_ylim(top=min(ax.get_ylim()[1], figures["heldout"]["unigram"] + 1.0))
    ax.set_title("embedded Gemma 2 (tiny): training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_card(folder: Path, meta: dict) -> None:
    f, c, t = meta["figures"], meta["corpus"], meta["train"]
    arch = meta["architecture"]
    src_rows = "\n".join(f"| `{s['package']}` ({s['deb'] or 'local'}) | {s['kind']} | {s['documents']:,} | "
                         f"{s['chars']:,} |" for s in c["sources"])
    abl_rows = "\n".join(
        f"| {r['layer']} | {r['sublayer']} | {r['ce_zero'] - r['ce_clean']:+.3f} | {r['ce_mean'] - r['ce_clean']:+.3f} |"
        for r in f["ablation"])
    h, s = f["heldout"], f["train_sample"]
    text = f"""# tiny: the embedded Gemma 2, trained here

A `Gemma2ForCausalLM` (transformers' own classes) trained on CPU on Python's documentation and
standard library, so that the pipeline's results on the embedded model mean something: its SAEs,
delta LM loss and ablations are those of a model that has learnt a language. It is tiny: nothing
found on it is a claim about Gemma 2 itself.

Rebuild from scratch: `make tiny-model` ({meta['build_seconds'] / 60:.0f} minutes on the 2-core machine that built
this one, {t['threads']} threads; deterministic for the seed and thread count; resumable). Configuration:
`conf/tiny_gemma.yaml`.

## Architecture
{arch['num_hidden_layers']} layers, d_model {arch['hidden_size']}, MLP {arch['intermediate_size']}, {arch['num_attention_heads']} query heads and
{arch['num_key_value_heads']} key/value heads of {arch['head_dim']}, local (sliding window {arch['sliding_window']}) and global attention alternating as
in Gemma 2, attention logits soft-capped at {arch['attn_logit_softcapping']}, final logits at {arch['final_logit_softcapping']}; vocabulary {meta['vocab_size']:,}
(byte-level BPE trained on the training documents; `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3);
{meta['parameters']:,} parameters (embeddings tied), float32.

## Corpus
| source | kind | documents | characters |
|---|---|---|---|
{src_rows}

License: both packages are under the PSF License Agreement (Python Software Foundation; the
documentation's code examples under the Zero-Clause BSD licence), which permits redistributing
derived works with the PSF's notice: "Copyright (c) 2001-2023 Python Software Foundation; All
Rights Reserved". Text fetched with `apt-get download` from Debian bookworm.

Documents: documentation pages cut at their top two heading levels, reST markup that is only markup
removed; source files cut at top-level statements. {c['train_documents']:,} training documents
({c['train_chars']:,} characters, {c['train_tokens']:,} tokens) and {c['heldout_documents']:,} held-out documents ({c['heldout_chars']:,} characters,
{c['heldout_tokens']:,} tokens), chosen by a hash of the document's name ({c['heldout_fraction']:.0%}) and never trained on.
The held-out documents are the harvester's bundled corpus (`harvest/corpus/bundled.jsonl`), so
`make demo` and the tests harvest text the model has not seen.

sha256 of the corpus (every document's name and text, training then held-out): `{c['sha256']}`

## Training
{t['total_tokens'] / 1e6:.1f}M tokens ({meta['steps']:,} steps of {t['batch_sequences']} sequences of {t['context_length']} tokens: BOS, then documents
joined by EOS, as the harvester packs them; {meta['epochs']:.1f} passes over the training sequences),
AdamW (betas {t['beta1']}, {t['beta2']}, weight decay {t['weight_decay']} on matrices), learning rate {t['lr']} after a linear
warm-up of {t['warmup_steps']} steps, cosine decay to {t['min_lr_fraction']} of it, gradient norm clipped at {t['grad_clip']}, seed {t['seed']}.

![loss](loss.png)

## Figures
Next-token cross-entropy in nats per prediction (every position after BOS):

| | model | bigram (interpolated Kneser-Ney) | unigram (add-one) |
|---|---|---|---|
| held-out documents ({h['predictions']:,} predictions) | **{h['model']:.3f}** | {h['bigram']:.3f} | {h['unigram']:.3f} |
| training sequences, a sample of as many | {s['model']:.3f} | {s['bigram']:.3f} | {s['unigram']:.3f} |

The n-gram baselines are counted on the training sequences (`ngram_counts.npz`, shipped here, so
tests score them without the corpus). The gap between training and held-out loss bounds the model's
memorisation from above (held-out documents are also other pages and modules than the training ones).

Ablations on {f['ablation'][0]['n_sequences']} held-out sequences: increase of cross-entropy when a site's
activation is replaced, at every non-BOS position, by zeros or by its mean over those positions:

| layer | site | zero-ablation | mean-ablation |
|---|---|---|---|
{abl_rows}

## Files
`config.json`, `model.safetensors`, `generation_config.json`, tokenizer files: the checkpoint,
loaded by `transformers.Gemma2ForCausalLM.from_pretrained` like any other; `ngram_counts.npz`;
`build.json` (everything above, machine-readable); `training_log.jsonl`; `loss.png`.
"""
    (folder / "README.md").write_text(text)
    (folder / "build.json").write_text(json.dumps(meta, indent=1) + "\n")

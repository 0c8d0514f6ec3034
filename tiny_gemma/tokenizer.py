"""The embedded models' tokenizer: byte-level BPE trained on the training documents, with Gemma's
special-token ids (<pad>=0, <eos>=1, <bos>=2, <unk>=3), saved as a transformers tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def train_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if [tok.token_to_id(s) for s in SPECIAL] != [0, 1, 2, 3]:
        raise RuntimeError("special tokens did not get ids 0-3")
    return tok


def as_transformers(tok, folder: Path | None = None):
    """A PreTrainedTokenizerFast around `tok`, saved into `folder` when given."""
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast

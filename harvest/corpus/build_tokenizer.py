"""How harvest/corpus/tiny_tokenizer.json was made (run once; the output is committed).

A byte-level BPE tokenizer for the embedded tiny model, trained on the bundled corpus, with
Gemma's special-token ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3.
"""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).parent
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def build(vocab_size: int = 2048) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [json.loads(line)["text"] for line in (HERE / "bundled.jsonl").open()]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


if __name__ == "__main__":
    tok = build()
    tok.save(str(HERE / "tiny_tokenizer.json"))
    print(tok.get_vocab_size(), [tok.token_to_id(s) for s in SPECIAL])

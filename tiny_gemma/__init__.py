"""The embedded Gemma 2 `tiny`: its corpus, tokenizer, training and model card (`make tiny-model`).

The trained checkpoint ships in `tiny_gemma/checkpoint/`; the harvester loads it like any other
checkpoint folder (conf/model/tiny.yaml). Nothing here runs when the pipeline does.
"""
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"

"""Shared SFT fixtures: a word-level tokenizer over digits, sorting examples of varied lengths, and a tiny
Llama, all built in-process. Imported by the SFT tests (tests/lm), their worker scripts and the metrics test."""

from __future__ import annotations

import random

from paperloop import SFTConfig, SFTTrainer
from paperloop.models import tiny_causal_lm, word_level_tokenizer

VOCAB = [str(i) for i in range(10)] + ["+", "=", "sort"]


def tokenizer():
    return word_level_tokenizer(VOCAB)


def sorting_examples(n: int, seed: int = 0, max_digits: int = 9) -> list[dict]:
    """`sort 3 1 2 =` -> ` 1 2 3`: prompts and completions of 1..max_digits digits, so lengths vary."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        digits = [str(rng.randrange(10)) for _ in range(rng.randrange(1, max_digits + 1))]
        examples.append({"prompt": "sort " + " ".join(digits) + " =", "completion": " " + " ".join(sorted(digits))})
    return examples


def model(hidden_size: int = 32, seed: int = 0):
    return tiny_causal_lm(len(VOCAB) + 8, hidden_size=hidden_size, num_layers=2, num_heads=2, seed=seed)


def make_trainer(out, n: int = 64, callbacks=(), val: int = 0, **cfg) -> SFTTrainer:
    settings = dict(max_length=24, batch_size=8, max_epochs=2, lr=3e-3, output_dir=str(out))
    settings.update(cfg)
    return SFTTrainer(model(), SFTConfig(**settings), tokenizer=tokenizer(), train_data=sorting_examples(n),
                      val_data=sorting_examples(val, seed=1) if val else None, callbacks=list(callbacks))

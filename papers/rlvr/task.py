"""Two-digit addition, one token per character: the prompts, the held-out split, and the verifiable reward."""

from __future__ import annotations

import random

from paperloop.models.lm import word_level_tokenizer


def make_tokenizer():
    return word_level_tokenizer(list("0123456789+="), per_character=True)


def split_problems(test_prompts: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All 8,100 pairs (a, b) of two-digit numbers, shuffled by `seed`: (train pairs, held-out pairs). The held-out
    pairs are never seen, neither by SFT nor by RL."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[test_prompts:], pairs[:test_prompts]


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def sft_examples(pairs) -> list[dict]:
    return [{"prompt": prompt(a, b), "completion": str(a + b)} for a, b in pairs]


def rl_prompts(pairs) -> list[dict]:
    return [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in pairs]


def correct(prompt_text: str, completion: str, example: dict) -> float:
    """The verifiable reward: 1 for exactly the sum, else 0."""
    return float(completion == example["answer"])

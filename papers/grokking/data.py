"""The algorithmic dataset of Power et al. (2022): every equation `a ∘ b = c (mod p)`, split into train and
validation by a training fraction. One token per number, operator and `=`; prompt `a ∘ b =`, completion `c`."""

from __future__ import annotations

import torch

from paperloop.models import word_level_tokenizer

OPERATIONS = {"add": "+", "subtract": "-", "divide": "/"}


def answer(a: int, b: int, operation: str, p: int) -> int:
    if operation == "add":
        return (a + b) % p
    if operation == "subtract":
        return (a - b) % p
    return (a * pow(b, -1, p)) % p  # division: a times b's inverse mod p (p prime, b != 0)


def equations(p: int, operation: str) -> list[dict]:
    """Every equation as a prompt/completion example, in (a, b) order; division skips b = 0."""
    symbol = OPERATIONS[operation]
    return [{"prompt": f"{a} {symbol} {b} =", "completion": f" {answer(a, b, operation, p)}"}
            for a in range(p) for b in range(p) if not (operation == "divide" and b == 0)]


def split(examples: list[dict], train_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random `train_fraction` of the equations to train on; the rest to validate on."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(train_fraction * len(examples))
    return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]


def tokenizer(p: int):
    return word_level_tokenizer([str(i) for i in range(p)] + [*OPERATIONS.values(), "="])

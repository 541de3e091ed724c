"""Preference pairs as tokens: a prompt with a chosen and a rejected completion, each scored on its completion only.

    pairs, skipped = tokenize_pairs([{"prompt": "2+2=", "chosen": "4", "rejected": "5"}], tok, max_length=64)
    batch = pair_batch(pairs, pad_id)   # rows 0..P-1 the chosen completions, P..2P-1 the rejected: one forward

A pair is TRL's shape: `{"prompt", "chosen", "rejected"}`, either three strings (the prompt with the tokenizer's
special tokens, each completion ending in EOS) or chat messages — the prompt a list of messages, each completion a
list of (assistant) messages or a string (one assistant message) — rendered by the chat template, its completion's
assistant turns trained and never the prompt's. Each side is an SFT example of `lm.data` (`tokenize_example`), so
the masks are SFT's. A pair whose chosen or rejected side has no trained token left after truncation to
`max_length` is skipped (and counted): it never reaches a loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..lm.data import TokenizedExample, load_examples, pad_batch, tokenize_example

KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True, eq=False)
class Pair:
    """One preference pair: its index in the source, and its chosen and rejected sides as SFT examples."""

    index: int
    chosen: TokenizedExample
    rejected: TokenizedExample
    margin: float = 0.0  # a reward model's required margin for this pair (the data's optional "margin")

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def side_examples(example, index: int) -> tuple[dict, dict, int]:
    """The pair's chosen and rejected sides as SFT examples, and the first message a chat side trains (the
    completion's); a ValueError names the pair and what is wrong."""
    if not isinstance(example, Mapping) or any(example.get(key) is None for key in KEYS):
        found = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"pair {index}: a preference pair is a dict with 'prompt', 'chosen' and 'rejected'; got {found}")
    prompt = example["prompt"]
    if isinstance(prompt, str):
        for key in ("chosen", "rejected"):
            if not isinstance(example[key], str):
                raise ValueError(f"pair {index}: a text prompt takes text completions, but {key!r} is a "
                                 f"{type(example[key]).__name__}")
        return ({"prompt": prompt, "completion": example["chosen"]},
                {"prompt": prompt, "completion": example["rejected"]}, 0)
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"pair {index}: 'prompt' is a string or a non-empty list of chat messages, got "
                         f"{type(prompt).__name__}")

    def completion(key: str) -> list:
        value = example[key]
        messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"pair {index}: {key!r} of a chat pair is a string or a non-empty list of messages")
        return messages

    return ({"messages": prompt + completion("chosen")}, {"messages": prompt + completion("rejected")}, len(prompt))


def tokenize_pairs(examples, tokenizer, max_length: int,
                   split_special_tokens: bool = False) -> tuple[list[Pair], list[tuple[int, str]]]:
    """Every pair of `examples` (a list, a map-style dataset, a JSONL path) tokenized: (kept, skipped as (index,
    reason)). `max_length`: the positions each side keeps (its start)."""
    examples = load_examples(examples)
    kept, skipped = [], []
    for index in range(len(examples)):
        chosen, rejected, first = side_examples(examples[index], index)
        split = split_special_tokens and not first  # a chat's template writes control tokens of its own
        sides = [tokenize_example(side, tokenizer, max_length, False, index, split, first_trained=first)
                 for side in (chosen, rejected)]
        empty = [name for name, side in zip(("chosen", "rejected"), sides) if side.num_trained == 0]
        if empty:
            cut = max(side.truncated for side in sides)
            skipped.append((index, f"no {' or '.join(empty)} token left" + (f" after truncation to max_length="
                                                                           f"{max_length}" if cut else "")))
            continue
        kept.append(Pair(index, *sides, margin=pair_margin(examples[index], index)))
    return kept, skipped


def pair_margin(example, index: int) -> float:
    margin = example.get("margin")
    if margin is None:
        return 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"pair {index}: 'margin' must be a finite number, got {margin!r}")
    return float(margin)


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """P pairs as one batch of 2P rows in `lm.data`'s shape — the chosen sides, then the rejected ones — so that one
    forward scores both, plus `pair_index` (P,): each pair's index in its source (to look up precomputed reference
    log-probs)."""
    batch = pad_batch([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], pad_id)
    batch["pair_index"] = torch.tensor([pair.index for pair in pairs], dtype=torch.long)
    return batch


def side_sums(values_B_T: torch.Tensor, weights_B_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair batch's per-row sums of `values_B_T` over the trained positions, split into (chosen_P, rejected_P)."""
    sums_B = (values_B_T * weights_B_T).sum(dim=1)
    return sums_B.chunk(2)

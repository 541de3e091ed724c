"""Controlled "sentiment" generation with a known reward: synthetic movie reviews, their prompts, the true reward.

A review is 16 words drawn from a two-mood Markov chain: the writer's mood (positive or negative) persists from
word to word and flips with probability `FLIP`; a positive mood writes positive words more often than negative
ones, and the reverse. Most words are neutral. The prompt is a review's first `PROMPT_WORDS` words, the completion
the other `COMPLETION_WORDS`.

The true reward plays the paper's sentiment classifier: r(x, y) = σ(Σ s(w)) over the words of the prompt and the
completion, each sentiment word with a weight s(w) of its own (positive or negative, ±0.15 to ±0.6) and neutral
words 0 — the probability that the review is positive under a logistic model, in (0, 1). A completion can raise
it by choosing positive words over neutral and negative ones, which costs KL against the SFT model that wrote
them at their natural rates: the trade-off the DPO paper's Figure 2 (left) plots.
"""

from __future__ import annotations

import math
import random

from paperloop.models.lm import word_level_tokenizer

POSITIVE = ("good", "fun", "fine", "warm", "solid", "charming", "clever", "pleasant", "gripping", "moving",
            "delightful", "beautiful", "brilliant", "superb", "wonderful", "masterful")
NEGATIVE = ("bad", "slow", "flat", "weak", "silly", "bland", "messy", "tired", "clumsy", "boring", "dull", "painful",
            "awful", "dreadful", "terrible", "unwatchable")
NEUTRAL = ("the", "a", "film", "movie", "plot", "story", "acting", "cast", "scene", "ending", "music", "director",
           "script", "camera", "pace", "dialogue", "was", "is", "and", "but", "very", "quite", "with", "its", "this",
           "of", "in", "at", "first", "then", "lead", "actor")
# Each sentiment word's weight: milder words first, stronger ones last (±0.15 .. ±0.6 in 16 steps).
WEIGHTS = {**{w: round(0.15 + 0.03 * i, 2) for i, w in enumerate(POSITIVE)},
           **{w: -round(0.15 + 0.03 * i, 2) for i, w in enumerate(NEGATIVE)}}

PROMPT_WORDS, COMPLETION_WORDS = 4, 12
FLIP = 0.15  # the mood flips between two words with this probability
P_SAME, P_OTHER = 0.30, 0.08  # a word's chance to carry the mood's sentiment, and the other one's (else neutral)


def make_tokenizer():
    """One token per word (the vocabulary above, after the special tokens)."""
    return word_level_tokenizer([*NEUTRAL, *POSITIVE, *NEGATIVE])


def review(rng: random.Random, words: int = PROMPT_WORDS + COMPLETION_WORDS) -> list[str]:
    """One review's words from the two-mood chain."""
    positive, out = rng.random() < 0.5, []
    for _ in range(words):
        u = rng.random()
        if u < P_SAME:
            out.append(rng.choice(POSITIVE if positive else NEGATIVE))
        elif u < P_SAME + P_OTHER:
            out.append(rng.choice(NEGATIVE if positive else POSITIVE))
        else:
            out.append(rng.choice(NEUTRAL))
        if rng.random() < FLIP:
            positive = not positive
    return out


def sft_examples(count: int, seed: int) -> list[dict]:
    """`count` whole reviews as SFT examples: the prompt its first words, the completion the rest."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = review(rng)
        examples.append({"prompt": " ".join(words[:PROMPT_WORDS]), "completion": " " + " ".join(words[PROMPT_WORDS:])})
    return examples


def prompts(count: int, seed: int) -> list[str]:
    """`count` review openings (prompts) from the same chain."""
    rng = random.Random(seed)
    return [" ".join(review(rng, PROMPT_WORDS)) for _ in range(count)]


def true_reward(prompt: str, completion: str) -> float:
    """σ(Σ s(w)) over the words of the prompt and the completion: the "sentiment classifier" (unknown words count 0)."""
    return 1.0 / (1.0 + math.exp(-sum(WEIGHTS.get(w, 0.0) for w in (prompt + " " + completion).split())))


def sentiment(prompt_text: str, completion: str, example: dict) -> float:
    """The true reward as RLTrainer's reward function."""
    return true_reward(prompt_text, completion)

"""Two-digit multiplication with a calculator: the tokenizer, the problems, the cold-start demonstrations, the tool
and the reward.

A transcript with the tool, one token per character except the tags and the tool's name:

    <bos>37*48=<call>mul(37,48)</call><result>1776</result>1776<eos>
            |--- the policy's call --|<- the tool's ->|policy|

The call action ends at `</call>` (a stop token, as ReTool's rollouts stop at the end of a code block), the
tool's result is appended by the environment, and the policy's next action is its answer. Without the tool, the
answer follows `=` directly.
"""

from __future__ import annotations

import random

from paperloop.envs import ToolEnv
from paperloop.models.lm import word_level_tokenizer

TAGS = ["<call>", "</call>", "<result>", "</result>", "mul"]


def make_tokenizer():
    tokenizer = word_level_tokenizer(list("0123456789*=(),"), per_character=True)
    tokenizer.add_tokens(TAGS)  # whole tokens: a call is 10 tokens, not 23
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """An action ends at EOS (an answer) or at `</call>` (a call, which the tool answers)."""
    return sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</call>")})


def split_problems(held_out: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All 8,100 pairs (a, b) of two-digit numbers, shuffled by `seed`: (train pairs, held-out pairs)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[held_out:], pairs[:held_out]


def prompt(a: int, b: int) -> str:
    return f"{a}*{b}="


def call(a: int, b: int) -> str:
    return f"<call>mul({a},{b})</call>"


def result(a: int, b: int) -> str:
    return f"<result>{a * b}</result>"


def sft_examples(pairs, tool_share: float, seed: int) -> list[dict]:
    """Cold-start demonstrations: a `tool_share` of the pairs (chosen by `seed`) solved with the tool — the call,
    then the answer after the tool's result, two examples whose prompts carry what came before, so the result is
    never trained — and the rest answered directly. tool_share=0: the text-only model's data."""
    rng = random.Random(seed)
    examples = []
    for a, b in pairs:
        if rng.random() < tool_share:
            examples.append({"prompt": prompt(a, b), "completion": call(a, b)})
            examples.append({"prompt": prompt(a, b) + call(a, b) + result(a, b), "completion": str(a * b)})
        else:
            examples.append({"prompt": prompt(a, b), "completion": str(a * b)})
    return examples


def rl_examples(pairs) -> list[dict]:
    return [{"prompt": prompt(a, b), "answer": str(a * b)} for a, b in pairs]


def mul(a: int, b: int) -> int:
    """The calculator."""
    return a * b


def correct(example, answer: str) -> float:
    """The outcome reward, as ReTool's: 1 for exactly the product, else 0."""
    return float(answer == example["answer"])


def correct_text(prompt_text, completion: str, example) -> float:
    """The same reward for the text-only run's single-turn completions."""
    return correct(example, completion)


def calculator_env():
    """example -> the tool-use episode: `mul` as the tool, the final answer scored by `correct`."""
    return ToolEnv.factory(tools=[mul], reward=correct, timeout_s=1.0, max_result_chars=16, max_calls=1)

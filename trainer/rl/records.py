"""What a step shows of its rollouts: a few of them as JSON-ready records (`rollouts.jsonl`) and as a markdown table
(TensorBoard's text), each with its prompt (the episode's first observation), what followed it, and its rewards."""

from __future__ import annotations

import torch

from .rollouts import Rollouts


def rollout_records(rollouts: Rollouts, texts: list[str], reward_names: list[str], shaped_N: torch.Tensor,
                    advantages_N: torch.Tensor) -> list[dict]:
    """The first len(`texts`) rollouts as dicts: prompt (the first observation: the example's "prompt" or
    "messages", or what an environment's reset returned), completion (`texts`: the transcript after it, special
    tokens skipped), each reward part's value (a reward function's; an environment's return, "env"), the total
    reward the advantages used (shaping included), the advantage, length (tokens the policy sampled), turns, and
    whether it stopped (the environment ended it after an action that ended at a stop token) or was truncated (by
    max_new_tokens or max_turns)."""
    count = len(texts)
    episodes = rollouts.episodes
    rewards = rollouts.rewards_N_F[:count].tolist()
    lengths, stopped = rollouts.lengths_N[:count].tolist(), rollouts.stopped_N[:count].tolist()
    turns = episodes.turns_N[:count].tolist()
    return [{"prompt": episodes.first_N[n], "completion": texts[n], "rewards": dict(zip(reward_names, rewards[n])),
             "reward": float(shaped_N[n]), "advantage": float(advantages_N[n]), "length": lengths[n],
             "turns": turns[n], "stopped": stopped[n], "truncated": not stopped[n]} for n in range(count)]


def completions_text(rollouts: Rollouts, texts: list[str]) -> str:
    """The first len(`texts`) rollouts with their rewards, as a markdown table (TensorBoard renders it)."""
    lines = ["| prompt | completion | reward |", "|---|---|---|"]
    for n, text in enumerate(texts):
        cells = [str(cell).replace("|", "\\|").replace("\n", " ") for cell in (rollouts.episodes.first_N[n], text)]
        lines.append(f"| {cells[0]} | {cells[1]} | {float(rollouts.rewards_N[n]):.4g} |")
    return "\n".join(lines)

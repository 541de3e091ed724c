"""What a step shows of its rollouts: a few of them as JSON-ready records (`rollouts.jsonl`) and as a markdown table
(TensorBoard's text), each with its prompt (the episode's first observation), what followed it, and its rewards;
the episodes' and the policy loss's metrics over every process."""

from __future__ import annotations

import json
from typing import Callable

import torch

from .envs import Episodes
from .prompts import jsonable
from .rollouts import Rollouts


def transcript_texts(episodes: Episodes, tokenizer, count: int) -> list[str]:
    """The first `count` episodes' transcripts after their first observation, as text (special tokens skipped: a
    completion reads as the reward functions read it)."""
    first = episodes.take(range(min(count, len(episodes))))
    return tokenizer.batch_decode([tokens[start:] for tokens, start in zip(first.transcripts(),
                                                                           first.first_lengths_N.tolist())],
                                  skip_special_tokens=True)


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
    return [{"prompt": as_json(episodes.first_N[n]), "completion": texts[n], "rewards": dict(zip(reward_names, rewards[n])),
             "reward": float(shaped_N[n]), "advantage": float(advantages_N[n]), "length": lengths[n],
             "turns": turns[n], "stopped": stopped[n], "truncated": not stopped[n]} for n in range(count)]


def as_json(value):
    """`value` as JSON holds it (a chat message may carry numpy numbers or other metadata JSON cannot write:
    written by content, as `rl.prompts` fingerprints them, rather than failing the run at its first log)."""
    return json.loads(json.dumps(value, default=jsonable))


def completions_text(rollouts: Rollouts, texts: list[str]) -> str:
    """The first len(`texts`) rollouts with their rewards, as a markdown table (TensorBoard renders it)."""
    lines = ["| prompt | completion | reward |", "|---|---|---|"]
    for n, text in enumerate(texts):
        cells = [str(cell).replace("|", "\\|").replace("\n", " ") for cell in (rollouts.episodes.first_N[n], text)]
        lines.append(f"| {cells[0]} | {cells[1]} | {float(rollouts.rewards_N[n]):.4g} |")
    return "\n".join(lines)


def episode_metrics(episodes: Episodes, reduce_sum: Callable, gather_objects: Callable, multi_turn: bool,
                    device: torch.device) -> dict:
    """Over every process: `env/<key>`, the mean of each number the environments' steps reported under that key
    (their dicts gathered only when some process has one), and for multi-turn episodes `rollout/turns_mean` and
    `rollout/env_tokens_frac` (the share of the transcripts' tokens after the first observation that the environment
    put there). `reduce_sum` sums a tensor (on `device`) over the processes, `gather_objects` concatenates their
    lists."""
    totals = torch.tensor([int(episodes.turns_N.sum()), len(episodes), int(episodes.env_tokens_N.sum()),
                           int(episodes.policy_tokens_N.sum()), len(episodes.metrics)], dtype=torch.float64)
    turns, count, env_tokens, policy_tokens, keys = reduce_sum(totals.to(device)).tolist()
    sums: dict = {}
    for part in (gather_objects([episodes.metrics]) if keys else []):
        for key, (total, n) in part.items():
            old = sums.get(key, (0.0, 0))
            sums[key] = (old[0] + total, old[1] + n)
    metrics = {f"env/{key}": total / n for key, (total, n) in sorted(sums.items())}
    if multi_turn:
        metrics.update({"rollout/turns_mean": turns / count,
                        "rollout/env_tokens_frac": env_tokens / max(env_tokens + policy_tokens, 1)})
    return metrics


def policy_metrics(parts: list[dict], reduce_sum: Callable) -> dict:
    """Token-weighted means of the micro-batches' policy metrics (`policy/`, and the lag's `async/` weights) over every
    update and process: `parts` holds each micro-batch's metrics and its trained "tokens"."""
    keys = sorted(k for k in parts[0] if k.startswith(("policy/", "async/")))
    sums = torch.stack([sum(p[k] * p["tokens"] for p in parts) for k in keys] + [sum(p["tokens"] for p in parts)])
    *totals, tokens = reduce_sum(sums).unbind()
    return {k: total / tokens.clamp_min(1) for k, total in zip(keys, totals)}

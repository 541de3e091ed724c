"""Scoring a model on held-out pairs with the calculator available, and the results files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from paperloop.lm import pad_token_id
from paperloop.rl import Episodes, play

from .task import calculator_env, rl_examples, stop_token_ids

PROMPTS_PER_CALL = 50  # x eval_samples episodes a batch


def evaluate(model, tokenizer, pairs, samples: int, temperature: float, max_new_tokens: int, max_turns: int,
             seed: int) -> dict:
    """Every model plays the same episodes, the calculator available to all (a text-only model simply never calls
    it): greedy accuracy and tool-call rate, and from `samples` episodes per pair at `temperature`, pass@1 (the
    mean accuracy), the tool-call rate (episodes with a call) and the mean number of turns."""
    generator = torch.Generator().manual_seed(seed)
    greedy = episodes(model, tokenizer, pairs, 1, 0.0, max_new_tokens, max_turns, generator)
    sampled = episodes(model, tokenizer, pairs, samples, temperature, max_new_tokens, max_turns, generator)

    def tool_rate(played: Episodes) -> float:  # an action without a call ends an episode: more turns, a call
        return float(np.mean(played.turns_N.numpy() > 1))

    return {"greedy_acc": round(float(np.mean(greedy.returns_N.numpy())), 4),
            "greedy_tool_rate": round(tool_rate(greedy), 4),
            "pass@1": round(float(np.mean(sampled.returns_N.numpy())), 4), "tool_rate": round(tool_rate(sampled), 4),
            "turns_mean": round(float(np.mean(sampled.turns_N.numpy())), 3)}


def episodes(model, tokenizer, pairs, n: int, temperature: float, max_new_tokens: int, max_turns: int,
             generator: torch.Generator) -> Episodes:
    env, examples = calculator_env(), rl_examples(pairs)
    parts = []
    model.eval()
    for start in range(0, len(examples), PROMPTS_PER_CALL):
        chunk = examples[start:start + PROMPTS_PER_CALL]
        envs = [env(copy.deepcopy(example)) for example in chunk for _ in range(n)]
        names = [f"held-out pair {example['prompt']}" for example in chunk for _ in range(n)]
        parts.append(play(model, tokenizer, envs, list(range(len(envs))), names, group_size=n, max_turns=max_turns,
                          max_new_tokens=max_new_tokens, generator=generator, temperature=temperature, top_p=1.0,
                          stop_token_ids=stop_token_ids(tokenizer), pad_token_id=pad_token_id(tokenizer),
                          max_positions=model.config.max_position_embeddings))
    return Episodes.concat(parts)


KEYS = ("greedy_acc", "pass@1", "greedy_tool_rate", "tool_rate", "turns_mean", "train_seconds")
LABELS = {"sft_tool": "cold-start SFT (some demos use the tool)", "rl_tool": "RL with the tool (ReTool)",
          "sft_text": "text-only SFT", "rl_text": "text-only RL"}


def over_seeds(rows: list[dict]) -> list[dict]:
    """Per model: mean and standard deviation (Bessel; 0 for one seed) over seeds of every score."""
    out = []
    for model in LABELS:
        runs = [r for r in rows if r["model"] == model]
        if runs:
            out.append({"model": model, "seeds": [r["seed"] for r in runs],
                        **{k: {"mean": float(np.mean([r[k] for r in runs])),
                               "std": float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0}
                           for k in KEYS}})
    return out


def write_results(out: Path, paper: str, rows: list[dict], settings: dict) -> None:
    result = {"paper": paper, "rows": rows, "over_seeds": over_seeds(rows), **settings}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(results_table(paper, result))
    plot(settings["curves"], out / "results.png")


def results_table(paper: str, result: dict) -> str:
    seeds = len(result["over_seeds"][0]["seeds"])
    lines = [f"# {paper}", "", f"Held-out pairs: {result['held_out']}; {result['eval_samples']} sampled episodes each at "
             f"temperature {result['eval_temperature']}; {seeds} seed(s), mean ± std; total wall time "
             f"{result['seconds']:.0f} s.", "",
             "| model | greedy acc | pass@1 | tool calls (greedy) | tool calls (sampled) | mean turns | train s |",
             "|---|---|---|---|---|---|---|"]
    for m in result["over_seeds"]:
        def pct(key):
            return f"{100 * m[key]['mean']:.1f} ± {100 * m[key]['std']:.1f}%"
        lines.append(f"| {LABELS[m['model']]} | {pct('greedy_acc')} | {pct('pass@1')} | {pct('greedy_tool_rate')} | "
                     f"{pct('tool_rate')} | {m['turns_mean']['mean']:.2f} ± {m['turns_mean']['std']:.2f} | "
                     f"{m['train_seconds']['mean']:.0f} ± {m['train_seconds']['std']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path) -> None:
    """Training accuracy (the rollouts' mean reward) of both RL runs and the tool run's tool-call rate (answers
    that used the tool), over RL steps; the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, style in (("tool", "-"), ("text", "--")):
        runs = [v for k, v in curves.items() if k.startswith(name + "_") and v]
        if not runs:
            continue
        steps = [row[0] for row in runs[0]]
        accuracy = np.mean([[row[1] for row in run[:len(steps)]] for run in runs], axis=0)
        left.plot(steps, 100 * accuracy, style, label=f"RL {'with the tool' if name == 'tool' else 'text-only'}")
        if name == "tool":
            rate = np.mean([[row[2] if row[2] is not None else np.nan for row in run[:len(steps)]] for run in runs],
                           axis=0)
            right.plot(steps, 100 * rate, style, color="C0")
    left.set(xlabel="RL step", ylabel="training accuracy (%)", title="accuracy of the rollouts")
    right.set(xlabel="RL step", ylabel="answers that used the tool (%)", title="tool-call rate (RL with the tool)",
              ylim=(0, 100))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

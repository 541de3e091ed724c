"""pass@k on held-out prompts (unbiased estimator from n samples each), greedy accuracy, and the results files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from paperloop.lm import default_stop_token_ids, pad_token_id, sample
from paperloop.rl import pass_at_k

from .task import prompt

PROMPTS_PER_CALL = 16  # x n samples each: 4,096 rows a sampling call at n = 256


def evaluate(model, tokenizer, pairs, samples: int, temperature: float, max_new_tokens: int, seed: int) -> dict:
    """n = `samples` completions per held-out pair at `temperature`: pass@k for k = 1, 2, 4, ..., n, the greedy
    accuracy, the mean sampled completion length (tokens, EOS included), and which pairs any sample solved."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [tokenizer(prompt(a, b))["input_ids"] for a, b in pairs]
    answers = [str(a + b) for a, b in pairs]
    stop = dict(eos_token_id=default_stop_token_ids(tokenizer, model), pad_token_id=pad_token_id(tokenizer))
    greedy = sample(model, prompts, 1, max_new_tokens, generator=generator, temperature=0.0, **stop)
    greedy_acc = np.mean([t == a for t, a in zip(tokenizer.batch_decode(greedy.completions(),
                                                                        skip_special_tokens=True), answers)])
    correct_P, lengths = [], []
    for start in range(0, len(prompts), PROMPTS_PER_CALL):
        drawn = sample(model, prompts[start:start + PROMPTS_PER_CALL], samples, max_new_tokens, generator=generator,
                       temperature=temperature, **stop)
        texts = tokenizer.batch_decode(drawn.completions(), skip_special_tokens=True)
        lengths.append(drawn.lengths_N)
        for i, answer in enumerate(answers[start:start + PROMPTS_PER_CALL]):
            correct_P.append(sum(t == answer for t in texts[i * samples:(i + 1) * samples]))
    correct_P = np.array(correct_P)
    ks = [2 ** i for i in range(int(np.log2(samples)) + 1)]
    mean_len = torch.cat(lengths).float().mean().item()  # over every sample (the last call may hold fewer)
    return {"pass_at": {str(k): round(float(pass_at_k(samples, correct_P, k).mean()), 4) for k in ks},
            "greedy_acc": round(float(greedy_acc), 4), "mean_completion_len": round(mean_len, 3),
            "solved": (correct_P > 0).tolist()}


def coverage(rows: list[dict]) -> dict:
    """For each RL method: held-out pairs it solves (some sample right) that SFT never does, and the reverse —
    the paper's "reasoning boundary" (RL's solvable set sits inside the base model's)."""
    base = np.array(next(r for r in rows if r["method"] == "sft")["solved"])
    out = {}
    for row in rows:
        if row["method"] != "sft":
            solved = np.array(row["solved"])
            out[row["method"]] = {"only_rl": int((solved & ~base).sum()), "only_sft": int((base & ~solved).sum()),
                                  "both": int((solved & base).sum()), "pairs": len(base)}
    return out


def write_results(out: Path, paper: str, rows: list[dict], settings: dict) -> None:
    table = [{k: v for k, v in row.items() if k != "solved"} for row in rows]
    result = {"paper": paper, "rows": table, "coverage": coverage(rows), **settings}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(results_table(paper, table, result["coverage"], settings))
    plot(table, out / "results.png", settings)


def results_table(paper: str, rows: list[dict], cover: dict, settings: dict) -> str:
    ks = list(rows[0]["pass_at"])
    shown = [k for k in ks if k in ("1", "4", "16", "64", "256")] or ks
    lines = [f"# {paper}", "", f"Held-out prompts: {settings['held_out']}; {settings['eval_samples']} samples each at "
             f"temperature {settings['eval_temperature']}; total wall time {settings['seconds']['total']:.0f} s.", "",
             "| method | greedy acc | " + " | ".join(f"pass@{k}" for k in shown) + " | mean completion len | train s |",
             "|---|---|" + "---|" * len(shown) + "---|---|"]
    for r in rows:
        cells = " | ".join(f"{100 * r['pass_at'][k]:.1f}%" for k in shown)
        lines.append(f"| {r['method']} | {100 * r['greedy_acc']:.1f}% | {cells} | {r['mean_completion_len']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "| RL method | solved only by RL | solved only by SFT | solved by both | held-out pairs |",
              "|---|---|---|---|---|"]
    lines += [f"| {m} | {c['only_rl']} | {c['only_sft']} | {c['both']} | {c['pairs']} |" for m, c in cover.items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in rows:
        ks = [int(k) for k in r["pass_at"]]
        ax.plot(ks, [100 * v for v in r["pass_at"].values()], marker="o", markersize=3, label=r["method"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k on held-out prompts (%)")
    ax.set_title(f"2-digit addition: pass@k, temperature {settings['eval_temperature']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

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
    """For each RL run: held-out pairs it solves (some sample right) that SFT never does, and the reverse — the
    paper's "reasoning boundary" (RL's solvable set sits inside the base model's)."""
    base = np.array(next(r for r in rows if r["method"] == "sft")["solved"])
    out = {}
    for row in rows:
        if row["method"] != "sft":
            solved = np.array(row["solved"])
            out[label(row)] = {"only_rl": int((solved & ~base).sum()), "only_sft": int((base & ~solved).sum()),
                               "both": int((solved & base).sum()), "pairs": len(base)}
    return out


def label(row: dict) -> str:
    """A run's name: its stage folder (the method, with `_seed<s>` for other RL seeds)."""
    return row.get("stage", row["method"])


def over_seeds(rows: list[dict]) -> list[dict]:
    """Per method with several seeds: mean and standard deviation (Bessel) over its runs of the greedy accuracy,
    pass@k, prompts sampled and training seconds."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    out = []
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        if len(runs) < 2:
            continue
        values = {"greedy_acc": [r["greedy_acc"] for r in runs], "train_seconds": [r["train_seconds"] for r in runs],
                  **{f"pass@{k}": [r["pass_at"][k] for r in runs] for k in runs[0]["pass_at"]}}
        if all(r.get("prompts_sampled") is not None for r in runs):
            values["prompts_sampled"] = [r["prompts_sampled"] for r in runs]
        out.append({"method": method, "seeds": [r.get("seed") for r in runs],
                    **{k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))} for k, v in values.items()}})
    return out


def write_results(out: Path, paper: str, rows: list[dict], settings: dict) -> None:
    table = [{k: v for k, v in row.items() if k != "solved"} for row in rows]
    result = {"paper": paper, "rows": table, "coverage": coverage(rows), "over_seeds": over_seeds(table), **settings}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(results_table(paper, table, result["coverage"], settings, result["over_seeds"]))
    plot(table, out / "results.png", settings)


def results_table(paper: str, rows: list[dict], cover: dict, settings: dict, seeds: list[dict] = ()) -> str:
    ks = list(rows[0]["pass_at"])
    shown = [k for k in ks if k in ("1", "4", "16", "64", "256")] or ks
    lines = [f"# {paper}", "", f"Held-out prompts: {settings['held_out']}; {settings['eval_samples']} samples each at "
             f"temperature {settings['eval_temperature']}; total wall time {settings['seconds']['total']:.0f} s.", "",
             "| method | greedy acc | " + " | ".join(f"pass@{k}" for k in shown) + " | mean completion len | train s |",
             "|---|---|" + "---|" * len(shown) + "---|---|"]
    for r in rows:
        cells = " | ".join(f"{100 * r['pass_at'][k]:.1f}%" for k in shown)
        lines.append(f"| {label(r)} | {100 * r['greedy_acc']:.1f}% | {cells} | {r['mean_completion_len']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    lines += ["", "| RL method | solved only by RL | solved only by SFT | solved by both | held-out pairs |",
              "|---|---|---|---|---|"]
    lines += [f"| {m} | {c['only_rl']} | {c['only_sft']} | {c['both']} | {c['pairs']} |" for m, c in cover.items()]
    if seeds:
        top = ks[-1]
        lines += ["", "Over seeds (mean ± std):", "",
                  f"| method | seeds | greedy acc | pass@1 | pass@{top} | prompts sampled | train s |",
                  "|---|---|---|---|---|---|---|"]
        for m in seeds:
            def pct(key):
                return f"{100 * m[key]['mean']:.1f} ± {100 * m[key]['std']:.1f}%"
            sampled = m.get("prompts_sampled")
            sampled = f"{sampled['mean']:,.0f} ± {sampled['std']:,.0f}" if sampled else "-"
            lines.append(f"| {m['method']} | {len(m['seeds'])} | {pct('greedy_acc')} | {pct('pass@1')} | "
                         f"{pct(f'pass@{top}')} | {sampled} | {m['train_seconds']['mean']:.0f} ± "
                         f"{m['train_seconds']['std']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, settings: dict) -> None:
    """pass@k curves, one per method (the mean over its seeds when it has several)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        ks = [int(k) for k in runs[0]["pass_at"]]
        mean = [100 * np.mean([r["pass_at"][str(k)] for r in runs]) for k in ks]
        name = method if len(runs) == 1 else f"{method} ({len(runs)} seeds)"
        ax.plot(ks, mean, marker="o", markersize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k on held-out prompts (%)")
    ax.set_title(f"2-digit addition: pass@k, temperature {settings['eval_temperature']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The teacher's samples for SeqKD, the accuracy curve recorded while a student trains, and the results files.

The final scores of each model (greedy accuracy, sampled pass@k on the held-out pairs) are rlvr's `evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from paperloop.callbacks import Callback
from paperloop.lm import default_stop_token_ids, pad_token_id, sample

from ..rlvr.task import prompt

PROMPTS_PER_CALL = 1024  # rows of one sampling call: the tiny models' KV caches stay a few MB


def completions(model, tokenizer, pairs, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
    """One completion of each pair's prompt `a+b=` from `model`: greedy at temperature 0, else sampled at
    `temperature` from a stream seeded by `seed` (the same pairs, model and seed give the same texts)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [tokenizer(prompt(a, b))["input_ids"] for a, b in pairs]
    stop = dict(eos_token_id=default_stop_token_ids(tokenizer, model), pad_token_id=pad_token_id(tokenizer))
    texts = []
    for start in range(0, len(rows), PROMPTS_PER_CALL):
        drawn = sample(model, rows[start:start + PROMPTS_PER_CALL], 1, max_new_tokens, generator=generator,
                       temperature=temperature, **stop)
        texts += tokenizer.batch_decode(drawn.completions(), skip_special_tokens=True)
    return texts


def seqkd_examples(teacher, tokenizer, pairs, max_new_tokens: int, temperature: float, seed: int) -> list[dict]:
    """SeqKD's training set (Kim & Rush 2016): each training prompt with the teacher's completion in place of the
    sum, right or wrong (the student never sees the ground truth)."""
    texts = completions(teacher, tokenizer, pairs, max_new_tokens, temperature, seed)
    return [{"prompt": prompt(a, b), "completion": text} for (a, b), text in zip(pairs, texts)]


def greedy_accuracy(model, tokenizer, pairs, max_new_tokens: int) -> float:
    """The share of `pairs` whose greedy completion is exactly the sum."""
    texts = completions(model, tokenizer, pairs, max_new_tokens, 0.0, 0)
    return float(np.mean([text == str(a + b) for (a, b), text in zip(pairs, texts)]))


class AccuracyCurve(Callback):
    """Every `every` steps (and at the last), the student's greedy accuracy on the held-out `pairs`, kept as
    [(step, accuracy)] and written to `path` when the run has trained all its steps. Greedy decoding draws from no
    random stream, so recording the curve changes nothing a run trains; its points are checkpointed with the run,
    so a resumed stage's curve is the straight one's."""

    def __init__(self, tokenizer, pairs, max_new_tokens: int, every: int, path: Path):
        self.tokenizer, self.pairs, self.max_new_tokens, self.every, self.path = (tokenizer, pairs, max_new_tokens,
                                                                                   every, Path(path))
        self.points: list[list] = []

    def on_train_begin(self, trainer):
        self.points = []  # a resume loads the checkpoint's points right after this

    def on_batch_end(self, trainer, outputs):
        step = trainer.state.global_step
        if step % self.every == 0 or step == trainer.config.max_steps:
            accuracy = greedy_accuracy(trainer.unwrapped_model, self.tokenizer, self.pairs, self.max_new_tokens)
            self.points.append([step, round(accuracy, 4)])

    def on_train_end(self, trainer):
        if trainer.state.global_step >= trainer.config.max_steps and not trainer.state.interrupted:
            self.path.write_text(json.dumps(self.points) + "\n")

    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state: dict) -> None:
        self.points = [list(p) for p in state["points"]]


# ---- results ---------------------------------------------------------------------------------------------------

METHOD_NAMES = {"sft": "SFT on ground truth", "seqkd": "SeqKD (SFT on teacher samples)",
                "supervised_kd": "supervised KD (forward KL on ground truth)",
                "gkd_reverse_kl": "GKD on-policy, exact reverse KL (λ=1)",
                "gkd_jsd": "GKD on-policy, exact JSD β=0.5 (λ=1)",
                "gkd_forward_kl": "GKD on-policy, exact forward KL (λ=1)",
                "on_policy": "on-policy, sampled reverse KL as advantage", "grpo": "GRPO on the correctness reward"}


def gap_closed(accuracy: float, start: float, teacher: float) -> float:
    """The share of the gap between the student's start and the teacher that a student closed (1: the teacher's
    accuracy; negative: below where it started)."""
    return (accuracy - start) / (teacher - start) if teacher != start else float("nan")


def over_seeds(rows: list[dict], start: dict, teacher: dict) -> list[dict]:
    """Per method: the mean and standard deviation (Bessel; 0 for one seed) over its seeds of the greedy accuracy,
    pass@1, the gap to the teacher closed (by greedy accuracy) and the training seconds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        values = {"greedy_acc": [r["greedy_acc"] for r in runs], "pass@1": [r["pass_at"]["1"] for r in runs],
                  "gap_closed": [gap_closed(r["greedy_acc"], start["greedy_acc"], teacher["greedy_acc"])
                                 for r in runs],
                  "train_seconds": [r["train_seconds"] for r in runs]}
        out.append({"method": method, "seeds": [r["seed"] for r in runs],
                    **{k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                       for k, v in values.items()}})
    return out


def write_results(out: Path, paper: str, rows: list[dict], start: dict, teacher: dict, settings: dict) -> dict:
    strip = ("solved",)
    rows = [{k: v for k, v in r.items() if k not in strip} for r in rows]
    start, teacher = ({k: v for k, v in r.items() if k not in strip} for r in (start, teacher))
    seeds = over_seeds(rows, start, teacher)
    result = {"paper": paper, "teacher": teacher, "student_start": start, "rows": rows, "over_seeds": seeds,
              **settings}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(results_table(paper, seeds, start, teacher, settings))
    plot(rows, start, teacher, out / "results.png", settings)
    return result


def results_table(paper: str, seeds: list[dict], start: dict, teacher: dict, settings: dict) -> str:
    n_seeds = max(len(m["seeds"]) for m in seeds)

    def cell(m, key, percent=True):
        scale, unit = (100, "%") if percent else (1, "")
        mean, std = scale * m[key]["mean"], scale * m[key]["std"]
        return f"{mean:.1f} ± {std:.1f}{unit}" if len(m["seeds"]) > 1 else f"{mean:.1f}{unit}"

    lines = [f"# {paper}", "", f"{settings['held_out']} held-out pairs; pass@1 from {settings['eval_samples']} samples "
             f"each at temperature {settings['eval_temperature']:g}; {settings['steps']} student steps per method; {n_seeds} seed(s); total wall "
             f"time {settings['seconds']['total']:.0f} s.", "",
             "| model | seeds | greedy acc | pass@1 | gap to the teacher closed | train s |", "|---|---|---|---|---|---|",
             f"| teacher (SFT + GRPO, {settings['teacher_size']}) | - | {100 * teacher['greedy_acc']:.1f}% | "
             f"{100 * teacher['pass_at']['1']:.1f}% | - | {teacher['train_seconds']:.0f} |",
             f"| student start (SFT, {settings['student_size']}) | - | {100 * start['greedy_acc']:.1f}% | "
             f"{100 * start['pass_at']['1']:.1f}% | 0 | {start['train_seconds']:.0f} |"]
    for m in seeds:
        lines.append(f"| {METHOD_NAMES[m['method']]} | {len(m['seeds'])} | {cell(m, 'greedy_acc')} | "
                     f"{cell(m, 'pass@1')} | {cell(m, 'gap_closed', percent=True)} | "
                     f"{m['train_seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], start: dict, teacher: dict, path: Path, settings: dict) -> None:
    """Held-out greedy accuracy over student steps, one line per method (the mean over its seeds, the band one
    standard deviation), from the student's start at step 0; the teacher's accuracy as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(100 * teacher["greedy_acc"], color="black", linestyle="--", linewidth=1,
               label=f"teacher ({100 * teacher['greedy_acc']:.1f}%)")
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        steps = [0] + [s for s, _ in runs[0]["curve"]]
        acc_S_N = 100 * np.array([[start["greedy_acc"]] + [a for _, a in r["curve"]] for r in runs]).T  # (steps, seeds)
        mean = acc_S_N.mean(1)
        line, = ax.plot(steps, mean, marker="o", markersize=2.5, label=f"{METHOD_NAMES[method]}"
                        + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
        if len(runs) > 1:
            std = acc_S_N.std(1, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("student optimizer steps")
    ax.set_ylabel("greedy accuracy on held-out pairs (%)")
    ax.set_title(f"Distilling 2-digit addition: {settings['teacher_size']} teacher -> {settings['student_size']} student",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

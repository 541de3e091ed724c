"""Preference pairs labelled by the true reward; a policy's mean true reward and its sequence-level KL(π ‖ π_ref)
from samples; the results files (table, frontier figure, the paper's claims checked).

The KL is estimated by the chain rule: for a completion y sampled from π,

    KL(π ‖ π_ref) = E_y [ Σ_t KL(π(· | x, y_<t) ‖ π_ref(· | x, y_<t)) ]

each position's KL taken exactly over the whole (72-word) vocabulary. That is the sequence-level KL the paper plots,
with less variance than Σ_t log π/π_ref on the sampled tokens and never negative; and it is exactly 0 for the
reference itself (both forwards are the same computation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from paperloop.lm import default_stop_token_ids, pad_token_id, sample

from .task import true_reward

PROMPTS_PER_CALL = 64


def draw(model, tokenizer, prompt_texts: list[str], samples: int, max_new_tokens: int,
         generator: torch.Generator) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """`samples` completions of each prompt at temperature 1: (prompt ids, completion ids (EOS included where one
    was drawn), completion texts), prompt i's samples at rows i*samples .. i*samples+samples-1."""
    prompt_rows = [tokenizer(p)["input_ids"] for p in prompt_texts]
    stop = dict(eos_token_id=default_stop_token_ids(tokenizer, model), pad_token_id=pad_token_id(tokenizer))
    completions = []
    for start in range(0, len(prompt_rows), PROMPTS_PER_CALL):
        drawn = sample(model, prompt_rows[start:start + PROMPTS_PER_CALL], samples, max_new_tokens,
                       generator=generator, temperature=1.0, **stop)
        completions += drawn.completions()
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return [row for row in prompt_rows for _ in range(samples)], completions, texts


def preference_pairs(model, tokenizer, prompt_texts: list[str], max_new_tokens: int, seed: int) -> list[dict]:
    """Two completions of each prompt from `model` (the SFT model), the one with the higher true reward chosen (as
    the paper labels its pairs); a prompt whose two completions tie is left out."""
    _, _, texts = draw(model, tokenizer, prompt_texts, 2, max_new_tokens, torch.Generator().manual_seed(seed))
    pairs = []
    for i, prompt in enumerate(prompt_texts):
        a, b = texts[2 * i], texts[2 * i + 1]
        ra, rb = true_reward(prompt, a), true_reward(prompt, b)
        if ra != rb:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            pairs.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return pairs


@torch.no_grad()
def sequence_kl(policy, reference, prompt_rows: list[list[int]], completions: list[list[int]],
                pad_id: int) -> torch.Tensor:
    """(N,) Σ over each completion's positions of KL(π(·|prefix) ‖ π_ref(·|prefix)), exact over the vocabulary."""
    rows = [p + c for p, c in zip(prompt_rows, completions)]
    lengths = torch.tensor([len(r) for r in rows])
    ids_N_T = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    scored_N_T = torch.zeros(ids_N_T.shape)
    for i, (row, prompt) in enumerate(zip(rows, prompt_rows)):
        ids_N_T[i, :len(row)] = torch.tensor(row)
        scored_N_T[i, len(prompt) - 1:len(row) - 1] = 1  # the positions that predict a completion token
    attention_N_T = (torch.arange(ids_N_T.shape[1])[None] < lengths[:, None]).long()
    logp_N_T_V = policy(input_ids=ids_N_T, attention_mask=attention_N_T).logits.double().log_softmax(-1)
    logq_N_T_V = reference(input_ids=ids_N_T, attention_mask=attention_N_T).logits.double().log_softmax(-1)
    kl_N_T = (logp_N_T_V.exp() * (logp_N_T_V - logq_N_T_V)).sum(-1)
    return (kl_N_T * scored_N_T).sum(1)


def evaluate(policy, reference, tokenizer, prompt_texts: list[str], samples: int, max_new_tokens: int,
             seed: int) -> dict:
    """The policy's mean true reward over `samples` completions of each prompt, and its sequence-level KL to the
    reference (mean and standard error over the samples), the mean completion length (tokens, EOS included)."""
    generator = torch.Generator().manual_seed(seed)
    prompt_rows, completions, texts = draw(policy, tokenizer, prompt_texts, samples, max_new_tokens, generator)
    rewards = np.array([true_reward(prompt_texts[i // samples], text) for i, text in enumerate(texts)])
    kl = torch.cat([sequence_kl(policy, reference, prompt_rows[s:s + 256], completions[s:s + 256],
                                pad_token_id(tokenizer)) for s in range(0, len(completions), 256)]).numpy()
    return {"reward": round(float(rewards.mean()), 4), "kl": round(float(kl.mean()), 4),
            "kl_sem": round(float(kl.std(ddof=1) / np.sqrt(len(kl))), 4),
            "completion_len": round(float(np.mean([len(c) for c in completions])), 3)}


# ---- results ---------------------------------------------------------------------------------------------------

METHOD_NAMES = {"sft": "SFT (the reference)", "dpo": "DPO", "ipo": "IPO", "grpo_true": "GRPO + KL, true reward",
                "grpo_rm": "GRPO + KL, learned reward model"}


def over_seeds(rows: list[dict]) -> list[dict]:
    """Per (method, setting): the mean and standard deviation (Bessel; 0 for one seed) of reward and KL."""
    out = []
    for key in dict.fromkeys((r["method"], r["setting"]) for r in rows):
        runs = [r for r in rows if (r["method"], r["setting"]) == key]
        stats = {k: {"mean": float(np.mean([r[k] for r in runs])),
                     "std": float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0}
                 for k in ("reward", "kl")}
        out.append({"method": key[0], "setting": key[1], "seeds": [r["seed"] for r in runs], **stats})
    return out


def dominance(rows: list[dict], a: str, b: str) -> dict:
    """How many of method `b`'s points some point of method `a` (same seed) dominates — KL no higher, reward no
    lower — and the reverse: the frontier comparison of the paper, point by point."""
    def dominated(p, by):
        return any(q["kl"] <= p["kl"] and q["reward"] >= p["reward"] for q in by)

    counts = {f"{b}_dominated_by_{a}": 0, f"{a}_dominated_by_{b}": 0, f"{a}_points": 0, f"{b}_points": 0}
    for seed in dict.fromkeys(r["seed"] for r in rows):
        points = {m: [r for r in rows if r["method"] == m and r["seed"] == seed] for m in (a, b)}
        counts[f"{b}_dominated_by_{a}"] += sum(dominated(p, points[a]) for p in points[b])
        counts[f"{a}_dominated_by_{b}"] += sum(dominated(p, points[b]) for p in points[a])
        counts[f"{a}_points"] += len(points[a])
        counts[f"{b}_points"] += len(points[b])
    return counts


def write_results(out: Path, paper: str, rows: list[dict], settings: dict) -> dict:
    seeds = over_seeds(rows)
    comparisons = {f"{a} vs {b}": dominance(rows, a, b)
                   for a, b in (("dpo", "grpo_true"), ("dpo", "grpo_rm"), ("ipo", "grpo_true"), ("dpo", "ipo"))
                   if any(r["method"] == a for r in rows) and any(r["method"] == b for r in rows)}
    result = {"paper": paper, "rows": rows, "over_seeds": seeds, "dominance": comparisons, **settings}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(results_table(paper, rows, seeds, comparisons, settings))
    plot(rows, out / "results.png")
    return result


def results_table(paper: str, rows: list[dict], seeds: list[dict], comparisons: dict, settings: dict) -> str:
    n_seeds = len(dict.fromkeys(r["seed"] for r in rows))
    lines = [f"# {paper}", "", f"{settings['eval_prompts']} held-out prompts x {settings['eval_samples']} samples at "
             f"temperature 1; {n_seeds} seed(s); total wall time {settings['seconds']['total']:.0f} s.", "",
             "| method | setting | seeds | true reward | KL(π ‖ π_ref), nats |", "|---|---|---|---|---|"]
    for m in seeds:
        def cell(key, digits):
            mean, std = m[key]["mean"], m[key]["std"]
            return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(m["seeds"]) > 1 else f"{mean:.{digits}f}"
        lines.append(f"| {METHOD_NAMES[m['method']]} | {m['setting']} | {len(m['seeds'])} | {cell('reward', 3)} | "
                     f"{cell('kl', 2)} |")
    lines += ["", "Points dominated (another method's point of the same seed has KL no higher and reward no lower):",
              "", "| comparison | first's points dominated by the second's | second's points dominated by the first's |",
              "|---|---|---|"]
    for name, c in comparisons.items():
        a, b = name.split(" vs ")
        lines.append(f"| {METHOD_NAMES[a]} vs {METHOD_NAMES[b]} | {c[f'{a}_dominated_by_{b}']} of {c[f'{a}_points']} "
                     f"| {c[f'{b}_dominated_by_{a}']} of {c[f'{b}_points']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Reward vs KL, one point per (method, setting, seed), as the paper's Figure 2 (left)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    styles = {"sft": ("black", "*"), "dpo": ("tab:blue", "o"), "ipo": ("tab:purple", "D"),
              "grpo_true": ("tab:orange", "s"), "grpo_rm": ("tab:green", "^")}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, (color, marker) in styles.items():
        points = [r for r in rows if r["method"] == method]
        if points:
            ax.scatter([r["kl"] for r in points], [r["reward"] for r in points], color=color, marker=marker, s=28,
                       label=METHOD_NAMES[method], alpha=0.85)
            for r in points:
                if method != "sft" and r["seed"] == points[0]["seed"]:
                    ax.annotate(f"{r['setting']}", (r["kl"], r["reward"]), fontsize=6, xytext=(3, -6),
                                textcoords="offset points", color=color)
    ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
    ax.set_ylabel("mean true reward")
    ax.set_title("Reward vs KL: synthetic reviews, tiny Llama (labels: β)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Grokking (Power et al., 2022): validation accuracy on a ∘ b mod 97 reaches 99% long after training accuracy.

    paperloop run grokking output_dir=runs/grokking               # weight decay 1.0 and 0.0, ~10 min on 2 CPU cores
    paperloop run grokking weight_decays=[1.0] train_fraction=0.2  # one run

Each weight decay trains its own run under output_dir (TensorBoard logs and checkpoints included), through
SFTTrainer with the completion-only loss, and stops once validation accuracy reaches `target_acc`; then
results.json, results.md and results.png (Figure 1's accuracy curves, log x) are written there. Interrupted
(SIGTERM, Ctrl-C), a run checkpoints and the command stops; the same command again continues it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from paperloop import ConfigError, SFTConfig
from paperloop.callbacks import EarlyStopping, ProgressBar, TensorBoardLogger
from paperloop.models import tiny_causal_lm

from .data import OPERATIONS, equations, split, tokenizer
from .trainer import GrokkingTrainer

PAPER = "Power, Burda, Edwards, Babuschkin, Misra, \"Grokking: Generalization Beyond Overfitting on Small " \
        "Algorithmic Datasets\" (2022)"


@dataclass(frozen=True)
class Config(SFTConfig):
    modulus: int = 97
    operation: str = "add"
    train_fraction: float = 0.3
    data_seed: int = 0
    weight_decays: Tuple[float, ...] = (1.0, 0.0)
    target_acc: float = 99.0
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    betas: Tuple[float, float] = (0.9, 0.98)

    # Which of the paper's runs to make (and how to score them) may change between invocations, not how each trains.
    resume_may_change = SFTConfig.resume_may_change + ("weight_decays", "target_acc")

    def __post_init__(self):
        super().__post_init__()
        if self.operation not in OPERATIONS:
            raise ConfigError(f"operation: must be one of {', '.join(OPERATIONS)}, got {self.operation!r}")
        if not 0 < self.train_fraction < 1:
            raise ConfigError(f"train_fraction: must be in (0, 1), got {self.train_fraction}")
        if not self.weight_decays:
            raise ConfigError("weight_decays: name at least one weight decay to run")
        if self.modulus < 2 or (self.operation == "divide" and any(self.modulus % d == 0 for d in range(2, self.modulus))):
            raise ConfigError(f"modulus: must be a prime for division (and >= 2), got {self.modulus}")


def first_step(history: list[dict], key: str, target: float) -> int | None:
    """The first validation step at which `key` reached `target`, or None."""
    return next((h["step"] for h in history if h.get(key, -1) >= target), None)


def run_one(cfg: Config, weight_decay: float, train: list[dict], val: list[dict]) -> dict:
    """Train one weight decay in its own folder until validation accuracy reaches target_acc (or max_steps)."""
    run_dir = Path(cfg.output_dir) / f"weight_decay_{weight_decay:g}"
    run_cfg = dataclasses.replace(cfg, weight_decay=weight_decay, output_dir=str(run_dir))
    tok = tokenizer(cfg.modulus)
    model = tiny_causal_lm(len(tok), cfg.hidden_size, cfg.num_layers, cfg.num_heads, seed=cfg.seed)
    stop = EarlyStopping("val/acc", mode="max", patience=10**9, stopping_threshold=cfg.target_acc)
    trainer = GrokkingTrainer(model, run_cfg, tokenizer=tok, train_data=train, val_data=val,
                              callbacks=[stop, TensorBoardLogger(), ProgressBar()])
    start = time.perf_counter()
    state = trainer.fit(resume="auto")  # continues a run a signal or a time limit stopped
    if state.interrupted:
        raise KeyboardInterrupt(f"{run_dir.name} was interrupted at step {state.global_step} and checkpointed; "
                                "run the same command again to continue")
    history = list(state.val_history)
    if not history or history[-1]["step"] != state.global_step:  # a run shorter than val_every: measure its end
        history.append({"epoch": state.epoch, "step": state.global_step, **trainer.validate()})
    train_step, val_step = (first_step(history, k, cfg.target_acc) for k in ("val/train_acc", "val/acc"))
    return {"weight_decay": weight_decay, "train_acc_99_step": train_step, "val_acc_99_step": val_step,
            "ratio": round(val_step / train_step, 1) if train_step and val_step else None,
            "final_train_acc": round(history[-1]["val/train_acc"], 2), "final_val_acc": round(history[-1]["val/acc"], 2),
            "steps": state.global_step, "seconds": round(time.perf_counter() - start, 1),
            "curve": [[h["step"], round(h["val/train_acc"], 2), round(h["val/acc"], 2)] for h in history]}


def run(cfg: Config) -> Path:
    if cfg.weight_decay != SFTConfig.weight_decay:  # each run's weight decay comes from weight_decays
        raise ConfigError(f"weight_decay: grokking trains one run per value of weight_decays, which sets each run's "
                          f"weight decay; set weight_decays=[{cfg.weight_decay:g}] instead")
    # One intra-op thread: on a shared 2-core machine a second thread made steps slower, not faster.
    torch.set_num_threads(1)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = split(equations(cfg.modulus, cfg.operation), cfg.train_fraction, cfg.data_seed)
    rows = []
    for weight_decay in cfg.weight_decays:
        rows.append(run_one(cfg, weight_decay, train, val))
        r = rows[-1]
        print(f"weight decay {weight_decay:g}: train 99% at step {r['train_acc_99_step']}, validation 99% at step "
              f"{r['val_acc_99_step']} (final validation {r['final_val_acc']}%), {r['seconds']:.0f} s", flush=True)
    write_results(out, cfg, rows, len(train), len(val))
    return out


def write_results(out: Path, cfg: Config, rows: list[dict], n_train: int, n_val: int) -> None:
    setup = {"modulus": cfg.modulus, "operation": cfg.operation, "train_fraction": cfg.train_fraction,
             "train_examples": n_train, "val_examples": n_val, "max_steps": cfg.max_steps,
             "settings": json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                if k not in cfg.resume_may_change}))}
    (out / "results.json").write_text(json.dumps({"paper": PAPER, "setup": setup, "rows": rows}, indent=1) + "\n")
    (out / "results.md").write_text(results_table(cfg, rows))
    plot_curves(cfg, rows, out / "results.png")


def results_table(cfg: Config, rows: list[dict]) -> str:
    lines = [f"# {PAPER}", "",
             f"a {OPERATIONS[cfg.operation]} b (mod {cfg.modulus}), training fraction {cfg.train_fraction}, "
             f"budget {cfg.max_steps} steps, stop at {cfg.target_acc:g}% validation accuracy.", "",
             "| weight decay | train acc ≥ 99% at step | val acc ≥ 99% at step | ratio | final train acc | "
             "final val acc | steps | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        never = f"not within {r['steps']}"
        lines.append(f"| {r['weight_decay']:g} | {r['train_acc_99_step'] or never} | {r['val_acc_99_step'] or never} "
                     f"| {r['ratio'] or '—'} | {r['final_train_acc']:.1f}% | {r['final_val_acc']:.1f}% | {r['steps']} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(cfg: Config, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rows):
        steps, train_acc, val_acc = zip(*r["curve"])
        ax.plot(steps, train_acc, color="tab:red", label="train")
        ax.plot(steps, val_acc, color="tab:green", label="validation")
        ax.set_xscale("log")
        ax.set_xlabel("optimization steps")
        ax.set_title(f"weight decay {r['weight_decay']:g}", fontsize=10)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"a {OPERATIONS[cfg.operation]} b (mod {cfg.modulus}), {cfg.train_fraction:.0%} of the equations "
                 "for training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

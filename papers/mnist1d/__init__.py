"""MNIST-1D benchmark table (Greydanus, "Scaling Down Deep Learning", 2020).

    paperloop run mnist1d output_dir=runs/mnist1d            # all 8 rows, a few minutes on 2 CPU cores
    paperloop run mnist1d models=[cnn] shuffled=[false]       # one row

Each (model, shuffled) row trains its own run under output_dir (TensorBoard logs included); then
results.json, results.md (paper vs ours) and results.png (a bar chart) are written there. Interrupted
(SIGTERM, Ctrl-C), a row checkpoints and the command stops; the same command again continues it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from paperloop.callbacks import ProgressBar, TensorBoardLogger
from paperloop.models import BUILDERS, build_classifier
from paperloop import ConfigError, TrainerConfig
from paperloop.checkpoint import committed

from .data import datasets, generate
from .trainer import Classifier

PAPER = 'Greydanus, "Scaling Down Deep Learning" (2020), MNIST-1D benchmark table'
# Test accuracy (%) in the paper's table: (model, shuffled) -> accuracy.
PAPER_TEST_ACC = {("logistic", False): 32.0, ("logistic", True): 32.0, ("mlp", False): 68.0, ("mlp", True): 68.0,
                  ("cnn", False): 94.0, ("cnn", True): 56.0, ("gru", False): 91.0, ("gru", True): 57.0}


@dataclass(frozen=True)
class Config(TrainerConfig):
    models: Tuple[str, ...] = ("logistic", "mlp", "cnn", "gru")
    shuffled: Tuple[bool, ...] = (False, True)
    data_seed: int = 42
    permutation_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        unknown = [m for m in self.models if m not in BUILDERS]
        if unknown or not self.models:
            raise ConfigError(f"models: must be a non-empty list from {sorted(BUILDERS)}, got {list(self.models)}")
        if not self.shuffled:
            raise ConfigError("shuffled: must hold false, true or both")


def run_row(cfg: Config, raw: dict, model_name: str, shuffled: bool) -> dict:
    """Train one (model, shuffled) row in its own folder and return its result row."""
    train, test = datasets(raw, shuffled, cfg.permutation_seed)
    row_dir = Path(cfg.output_dir) / f"{model_name}{'-shuffled' if shuffled else ''}"
    torch.manual_seed(cfg.seed)  # the same initial weights for a row, run after run
    model = build_classifier(model_name, length=train.tensors[0].shape[1])
    trainer = Classifier(model, dataclasses.replace(cfg, output_dir=str(row_dir)), train_data=train,
                         val_data=test, test_data=test, callbacks=[TensorBoardLogger(), ProgressBar()])
    # A row stopped by a signal left a checkpoint: running the same command again continues from it.
    resume = "latest" if committed(trainer.checkpoint_dir) else None
    start = time.perf_counter()
    state = trainer.fit(resume=resume)
    if state.stop_reason == "signal":
        raise KeyboardInterrupt(f"{row_dir.name} was interrupted at step {state.global_step} and checkpointed; "
                                "run the same command again to continue")
    test_acc = trainer.test()["test/acc"]
    return {"model": model_name, "shuffled": shuffled, "test_acc": round(test_acc, 2),
            "paper_test_acc": PAPER_TEST_ACC[(model_name, shuffled)],
            "best_test_acc": round(max(h["val/acc"] for h in trainer.state.val_history), 2),
            "steps": trainer.state.global_step, "seconds": round(time.perf_counter() - start, 1)}


def run(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = generate(cfg.data_seed)
    grid = list(itertools.product(cfg.models, cfg.shuffled))
    rows = []
    for i, (model_name, shuffled) in enumerate(grid, 1):
        rows.append(run_row(cfg, raw, model_name, shuffled))
        r = rows[-1]
        print(f"[{i}/{len(grid)}] {model_name:8s} {'shuffled' if shuffled else 'original':8s} "
              f"test acc {r['test_acc']:5.1f}%  (paper {r['paper_test_acc']:.0f}%)  {r['seconds']:.0f} s", flush=True)
    write_results(out, rows)
    return out


def write_results(out: Path, rows: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps({"paper": PAPER, "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(results_table(rows))
    plot_results(rows, out / "results.png")


def results_table(rows: list[dict]) -> str:
    lines = [f"# {PAPER}", "", "| model | data | paper test acc | ours | difference | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'shuffled' if r['shuffled'] else 'original'} | {r['paper_test_acc']:.0f}% "
                     f"| {r['test_acc']:.1f}% | {r['test_acc'] - r['paper_test_acc']:+.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{'shuffled' if r['shuffled'] else 'original'}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    ax.bar([x - 0.2 for x in xs], [r["paper_test_acc"] for r in rows], width=0.4, label="paper")
    ax.bar([x + 0.2 for x in xs], [r["test_acc"] for r in rows], width=0.4, label="paperloop")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("MNIST-1D: paper vs paperloop")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

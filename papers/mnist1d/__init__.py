"""MNIST-1D benchmark table (Greydanus, "Scaling Down Deep Learning", 2020).

    paperloop run mnist1d output_dir=runs/mnist1d            # all 8 rows, about 5 minutes on 2 CPU cores
    paperloop run mnist1d models=[cnn] shuffled=[false]       # one row, merged into the folder's table
    paperloop run mnist1d --help                              # every config key, its default and meaning

Each (model, shuffled) row trains its own run under output_dir (TensorBoard logs included) with a
pinned number of intra-op threads (`threads`: results depend on it). A finished row records its
result and time in its folder and is reused when the same command runs again; results.json,
results.md (paper vs ours) and results.png (a bar chart) hold every finished row of the folder, a
subset's rows merged with the earlier ones. Interrupted (SIGTERM, Ctrl-C), a row checkpoints and the
command stops; the same command again continues it, and its time adds up over the invocations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from paperloop import ConfigError, TrainerConfig
from paperloop.callbacks import PlainProgress, TensorBoardLogger
from paperloop.lock import OutputLock
from paperloop.models import BUILDERS, build_classifier

from .data import datasets, generate
from .results import PAPER, PAPER_TEST_ACC, earlier_rows, merge, read_record, settings, write_record, write_results
from .trainer import Classifier

__all__ = ["Config", "run", "run_row", "PAPER", "PAPER_TEST_ACC", "Classifier", "generate"]


@dataclass(frozen=True)
class Config(TrainerConfig):
    models: Tuple[str, ...] = ("logistic", "mlp", "cnn", "gru")  # the paper's models to train
    shuffled: Tuple[bool, ...] = (False, True)  # false: the signals as they are; true: positions permuted
    data_seed: int = 42  # mnist1d's own default: the dataset the paper used
    permutation_seed: int = 0  # the fixed permutation of the 40 positions for the shuffled rows
    threads: int = 1  # intra-op threads (torch.set_num_threads): results depend on the thread count

    # Which of the paper's runs to make (and how to score them) may change between invocations, not how each trains.
    resume_may_change = TrainerConfig.resume_may_change + ("models", "shuffled")

    def __post_init__(self):
        super().__post_init__()
        unknown = [m for m in self.models if m not in BUILDERS]
        if unknown or not self.models:
            raise ConfigError(f"models: must be a non-empty list from {sorted(BUILDERS)}, got {list(self.models)}")
        if not self.shuffled:
            raise ConfigError("shuffled: must hold false, true or both")
        if self.threads < 1:
            raise ConfigError(f"threads: must be >= 1, got {self.threads}")


def run(cfg: Config) -> Path:
    """Train every row the config selects (reusing finished ones), then write the folder's results."""
    out = Path(cfg.output_dir)
    grid = list(itertools.product(cfg.models, cfg.shuffled))
    with OutputLock(out):  # the rows' folders are locked by their own runs
        earlier = earlier_rows(out, settings(cfg))
        for model_name, shuffled in grid:  # a row that ran with other settings is refused before any trains
            read_record(row_folder(cfg, model_name, shuffled), settings(cfg))
        rows, raw = [], None
        for i, (model_name, shuffled) in enumerate(grid, 1):
            row = finished_row(cfg, model_name, shuffled)
            reused = row is not None
            if not reused:
                raw = raw if raw is not None else generate(cfg.data_seed)
                row = run_row(cfg, raw, model_name, shuffled)
            rows.append(row)
            print(f"[{i}/{len(grid)}] {model_name:8s} {'shuffled' if shuffled else 'original':8s} "
                  f"test acc {row['test_acc']:5.1f}%  (paper {row['paper_test_acc']:.0f}%)  {row['seconds']:.0f} s"
                  + ("  (finished earlier: reused)" if reused else ""), flush=True)
        table = merge(earlier, rows)
        write_results(out, settings(cfg), table, torch.__version__)
    kept = len(table) - len(rows)
    if kept:
        print(f"results: this command's {len(rows)} row(s) merged with {kept} row(s) from earlier commands in "
              f"{out / 'results.json'} ({len(table)} rows)", flush=True)
    return out


def row_folder(cfg: Config, model_name: str, shuffled: bool) -> Path:
    return Path(cfg.output_dir) / f"{model_name}{'-shuffled' if shuffled else ''}"


def finished_row(cfg: Config, model_name: str, shuffled: bool) -> dict | None:
    """The row's recorded result when it has finished with these settings, else None."""
    record = read_record(row_folder(cfg, model_name, shuffled), settings(cfg))
    return record["result"] if record else None


def run_row(cfg: Config, raw: dict, model_name: str, shuffled: bool) -> dict:
    """Train one (model, shuffled) row in its own folder, record it there and return its result row.
    A finished row is not trained again; an interrupted one continues from its checkpoint."""
    if (done := finished_row(cfg, model_name, shuffled)) is not None:
        return done
    row_dir = row_folder(cfg, model_name, shuffled)
    record = read_record(row_dir, settings(cfg))
    train, test = datasets(raw, shuffled, cfg.permutation_seed)
    torch.manual_seed(cfg.seed)  # the same initial weights for a row, run after run
    model = build_classifier(model_name, length=train.tensors[0].shape[1])
    trainer = Classifier(model, dataclasses.replace(cfg, output_dir=str(row_dir)), train_data=train, val_data=test,
                         test_data=test, callbacks=[TensorBoardLogger(), PlainProgress(row_dir.name)])
    result, start = None, time.perf_counter()
    try:
        with intra_op_threads(cfg.threads):
            # A row stopped by a signal or a time limit left a checkpoint: the same command again continues it.
            state = trainer.fit(resume="auto")
            if not state.interrupted:
                result = row_result(trainer, model_name, shuffled)
    finally:  # whatever happened, this invocation's time counts
        seconds = round((record["seconds"] if record else 0.0) + time.perf_counter() - start, 1)
        if result is not None:
            result["seconds"] = seconds
        write_record(row_dir, settings(cfg), seconds, result)
    if result is None:
        raise KeyboardInterrupt(f"{row_dir.name} was interrupted at step {state.global_step} and checkpointed; "
                                "run the same command again to continue")
    return result


def row_result(trainer: Classifier, model_name: str, shuffled: bool) -> dict:
    test_acc = trainer.test()["test/acc"]
    # The final test is an evaluation too, so a run shorter than val_every_steps still has a best.
    evaluations = [h["val/acc"] for h in trainer.state.val_history] + [test_acc]
    return {"model": model_name, "shuffled": shuffled, "test_acc": round(test_acc, 2),
            "paper_test_acc": PAPER_TEST_ACC[(model_name, shuffled)], "best_test_acc": round(max(evaluations), 2),
            "steps": trainer.state.global_step}


@contextlib.contextmanager
def intra_op_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

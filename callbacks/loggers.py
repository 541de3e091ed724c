"""Loggers: `StepLogger`, what is logged when and under which name, and `TensorBoardLogger`, which writes it as
TensorBoard event files (`JSONLLogger`, in jsonl.py, writes the same as JSON lines). They act on the main process
only, and read tensors (a device sync each) only when a log is due (every `log_every_steps` steps, and at epoch and
run ends)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .base import Callback

RECORDS = "records/"  # an output under this prefix is a list of dicts, one per rollout or example: not a metric


def scalar(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def is_scalar(value) -> bool:
    """A number a logger writes as a scalar (a bool, such as `train/finite`, is a flag, not a curve)."""
    return isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)


class Throughput:
    """Samples per second between two log points."""

    def __init__(self):
        self.samples, self.since = 0, time.perf_counter()

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.samples / max(now - self.since, 1e-9)
        self.samples, self.since = 0, now
        return rate


class StepLogger(Callback):
    """When a log is due and what it holds, for every logger, so that two loggers never disagree. Per step, at
    the first step, every `every_n_steps` (default `log_every_steps`), and the last step of each epoch and of the
    run: `perf/samples_per_s` and the step's outputs but `loss` (this process's) and `train/samples`
    (training_step's own values as `train/<name>`; a trainer's namespaced ones, such as `reward/mean`, as they
    are), `records/*` apart. `val/*` whenever a validation ran; each epoch's mean train loss as
    `epoch/train_loss`.

    A subclass writes `_open(trainer)` (on the main process, when a run begins), `_write(metrics, step)`,
    and, where it keeps them, `_write_records(records, step)` and `_close()`."""

    def __init__(self, every_n_steps: int | None = None):
        self.every_n_steps = every_n_steps
        self.active = False

    def on_train_begin(self, trainer):
        self.active = trainer.is_main_process
        if not self.active:
            return
        self.every = self.every_n_steps or trainer.config.log_every_steps
        self.throughput = Throughput()
        self.last, self.logged_step, self.val_step = None, None, None
        self._open(trainer)

    def on_batch_end(self, trainer, outputs):
        if not self.active:
            return
        self.throughput.samples += outputs.get("train/samples", 0)
        step = trainer.state.global_step
        val = {k: v for k, v in outputs.items() if k.startswith("val/")}
        if val:  # a step validation ran
            self._write(val, step)
            self.val_step = step
        self.last = outputs  # written at the epoch's or the run's end when this step is not due
        if step == 1 or step % self.every == 0:
            self._write_step(outputs, step)

    def _write_step(self, outputs: dict, step: int):
        self.logged_step = step  # first: a write that raises is not tried again at the run's end
        metrics = {"perf/samples_per_s": self.throughput.take()}
        records = {}
        for key, value in outputs.items():
            if key in ("loss", "train/samples") or key.startswith("val/"):
                continue  # "loss" is this process's; train/loss is the step's over every process
            if key.startswith(RECORDS):
                records[key] = value
            else:
                metrics[key if "/" in key else f"train/{key}"] = value
        self._write(metrics, step)
        if records:
            self._write_records(records, step)

    def on_epoch_end(self, trainer, logs):
        if not self.active:
            return
        step = trainer.state.global_step
        if self.last is not None and self.logged_step != step:
            self._write_step(self.last, step)
        # The epoch's mean train loss gets its own tag: train/loss holds the per-step values.
        metrics = {"epoch/train_loss": logs["train/loss"]}
        if self.val_step != step:  # not already written by this step's validation
            metrics.update({k: v for k, v in logs.items() if k.startswith("val/")})
        self._write(metrics, step)

    def on_train_end(self, trainer):
        if not self.active:
            return
        self.active = False
        try:
            if self.last is not None and self.logged_step != trainer.state.global_step:
                self._write_step(self.last, trainer.state.global_step)
        finally:
            self._close()

    def _open(self, trainer) -> None: ...

    def _write(self, metrics: dict, step: int) -> None:
        raise NotImplementedError

    def _write_records(self, records: dict, step: int) -> None:
        """`records`: {"records/<name>": [dict, ...]} of a logged step; a logger that keeps no records ignores them."""

    def _close(self) -> None: ...


class TensorBoardLogger(StepLogger):
    """Event files under `log_dir` (default `<output_dir>/tensorboard`), at StepLogger's steps: `train/loss`,
    `optim/lr`, `optim/grad_norm` (when the step computed it: with clipping, or at the config's
    `log_every_steps`), `perf/samples_per_s` and every other numeric output of the step (training_step's own
    values as `train/<name>`; a trainer's namespaced ones, such as `reward/mean`, as they are; strings, such as
    `text/samples`, as text; `records/*` not at all). `val/*` whenever a validation ran; each epoch's mean train
    loss as `epoch/train_loss`; the resolved config as text."""

    def __init__(self, log_dir: str | None = None, every_n_steps: int | None = None):
        super().__init__(every_n_steps)
        self.log_dir = log_dir
        self.writer = None

    def logged_history(self, trainer) -> str | None:
        folder = Path(self.log_dir or Path(trainer.config.output_dir) / "tensorboard")
        return f"{folder} holds TensorBoard events" if any(folder.glob("events.out.tfevents.*")) else None

    def _open(self, trainer):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

        # A resumed run writes from the step after its checkpoint's: the killed run's events from there on go (its
        # events at the checkpoint's step are the ones the checkpoint holds, and stay).
        start = trainer.state.global_step
        self.writer = SummaryWriter(self.log_dir or str(Path(trainer.config.output_dir) / "tensorboard"),
                                    purge_step=start + 1 if start else None)
        self.writer.add_text("config", "```\n" + trainer.config_yaml() + "\n```", trainer.state.global_step)

    def on_epoch_end(self, trainer, logs):
        super().on_epoch_end(trainer, logs)
        if self.writer is not None:
            self.writer.flush()

    def _write(self, metrics: dict, step: int):
        for key, value in metrics.items():
            if isinstance(value, str):  # e.g. a trainer's sampled completions, as "text/samples"
                self.writer.add_text(key, value, step)
            elif is_scalar(value):
                self.writer.add_scalar(key, scalar(value), step)

    def _close(self):
        self.writer.close()
        self.writer = None

"""TensorBoardLogger: metrics as TensorBoard event files. It acts on the main process only, and reads tensors (a
device sync each) only when a log is due (every `log_every_steps` steps, and at epoch and run ends)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .base import Callback


def scalar(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class Throughput:
    """Samples per second between two log points."""

    def __init__(self):
        self.samples, self.since = 0, time.perf_counter()

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.samples / max(now - self.since, 1e-9)
        self.samples, self.since = 0, now
        return rate


class TensorBoardLogger(Callback):
    """Event files under `log_dir` (default `<output_dir>/tensorboard`). Per step, at the first step,
    every `every_n_steps` (default `log_every_steps`), and the last step of each epoch and of the run:
    `train/loss`, `optim/lr`, `optim/grad_norm` (when the step computed it: with clipping, or at the
    config's `log_every_steps`), `perf/samples_per_s` and every other numeric output of the step
    (training_step's own values as `train/<name>`; a trainer's namespaced ones, such as `reward/mean`,
    as they are; strings, such as `text/samples`, as text). `val/*` whenever a validation
    ran; each epoch's mean train loss as `epoch/train_loss`; the resolved config as text."""

    def __init__(self, log_dir: str | None = None, every_n_steps: int | None = None):
        self.log_dir, self.every_n_steps = log_dir, every_n_steps

    def on_train_begin(self, trainer):
        self.writer = None
        if not trainer.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

        self.every = self.every_n_steps or trainer.config.log_every_steps
        self.writer = SummaryWriter(self.log_dir or str(Path(trainer.config.output_dir) / "tensorboard"),
                                    purge_step=trainer.state.global_step or None)
        self.writer.add_text("config", "```\n" + trainer.config_yaml() + "\n```", trainer.state.global_step)
        self.throughput = Throughput()
        self.last, self.logged_step, self.val_step = None, None, None

    def on_batch_end(self, trainer, outputs):
        if self.writer is None:
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
        metrics = {"perf/samples_per_s": self.throughput.take()}
        for key, value in outputs.items():
            if key in ("loss", "train/samples") or key.startswith("val/"):
                continue  # "loss" is this process's; train/loss is the step's over every process
            metrics[key if "/" in key else f"train/{key}"] = value
        self._write(metrics, step)
        self.logged_step = step

    def on_epoch_end(self, trainer, logs):
        if self.writer is None:
            return
        step = trainer.state.global_step
        if self.last is not None and self.logged_step != step:
            self._write_step(self.last, step)
        # The epoch's mean train loss gets its own tag: train/loss holds the per-step values.
        metrics = {"epoch/train_loss": logs["train/loss"]}
        if self.val_step != step:  # not already written by this step's validation
            metrics.update({k: v for k, v in logs.items() if k.startswith("val/")})
        self._write(metrics, step)
        self.writer.flush()

    def _write(self, metrics: dict, step: int):
        for key, value in metrics.items():
            if isinstance(value, str):  # e.g. a trainer's sampled completions, as "text/samples"
                self.writer.add_text(key, value, step)
            elif isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
                self.writer.add_scalar(key, scalar(value), step)

    def on_train_end(self, trainer):
        if self.writer is not None:
            if self.last is not None and self.logged_step != trainer.state.global_step:
                self._write_step(self.last, trainer.state.global_step)
            self.writer.close()
            self.writer = None

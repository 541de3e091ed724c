"""Progress for people: a tqdm bar in a terminal (ProgressBar), and plain lines for batch jobs whose log is a
file (PlainProgress). Both act on the main process only and read the loss (a device sync) only when they show it."""

from __future__ import annotations

import sys
import time

from .base import Callback
from .loggers import Throughput, scalar


class ProgressBar(Callback):
    """A tqdm bar over steps with epoch, loss, lr and samples/s; silent when stderr is not a
    terminal (tqdm's `disable=None`), so logs of batch jobs stay clean."""

    def __init__(self, every_n_steps: int | None = None, disable: bool | None = None):
        self.every_n_steps, self.disable = every_n_steps, disable

    def on_train_begin(self, trainer):
        self.bar = None
        if not trainer.is_main_process:
            return
        from tqdm.auto import tqdm

        self.every = self.every_n_steps or trainer.config.log_every_steps
        self.bar = tqdm(total=trainer.total_steps(), initial=trainer.state.global_step, unit="step",
                        disable=self.disable, dynamic_ncols=True)
        self.postfix: dict = {}
        self.throughput = Throughput()

    def on_batch_end(self, trainer, outputs):
        if self.bar is None:
            return
        self.bar.update(1)
        self.throughput.samples += outputs.get("train/samples", 0)
        if trainer.state.global_step % self.every == 0 and not self.bar.disable:
            self.postfix.update(epoch=trainer.state.epoch, samples_s=f"{self.throughput.take():.0f}")
            if "train/loss" in outputs:
                self.postfix["loss"] = f"{scalar(outputs['train/loss']):.4g}"
            if "optim/lr" in outputs:
                self.postfix["lr"] = f"{outputs['optim/lr']:.3g}"
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_epoch_end(self, trainer, logs):
        if self.bar is not None and not self.bar.disable:
            self.postfix.update({k: f"{scalar(v):.4g}" for k, v in logs.items() if k.startswith("val/")})
            self.postfix["epoch"] = trainer.state.epoch
            self.bar.set_postfix(self.postfix)

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PlainProgress(Callback):
    """One line when a row starts ("training M steps") or resumes ("resumed at step N of M"), and,
    when `stream` (default stderr) is not a terminal, so ProgressBar draws nothing, one plain line
    every `log_every_steps` steps with the step, loss, speed and time left."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream

    def on_train_begin(self, trainer):
        self.out = self.stream or sys.stderr
        self.active = trainer.is_main_process
        if not self.active:
            return
        self.total, self.first = trainer.total_steps(), trainer.state.global_step
        self.every = trainer.config.log_every_steps
        self.plain = not self.out.isatty()
        started = f"resumed at step {self.first} of {self.total}" if self.first else f"training {self.total} steps"
        print(f"{self.label}: {started}", file=self.out, flush=True)
        self.start = time.perf_counter()

    def on_batch_end(self, trainer, outputs):
        step = trainer.state.global_step
        if not (self.active and self.plain) or step % self.every:
            return
        elapsed = time.perf_counter() - self.start
        rate = (step - self.first) / max(elapsed, 1e-9)
        loss = f", loss {scalar(outputs['train/loss']):.4g}" if "train/loss" in outputs else ""
        print(f"{self.label}: step {step}/{self.total} ({100 * step / self.total:.0f}%){loss}, {rate:.0f} steps/s, "
              f"about {(self.total - step) / max(rate, 1e-9):.0f} s left", file=self.out, flush=True)

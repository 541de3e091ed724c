"""PlainProgress: what a batch job's log shows of a row, where no progress bar is drawn."""

from __future__ import annotations

import sys
import time

from paperloop.callbacks import Callback
from paperloop.callbacks.loggers import scalar


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

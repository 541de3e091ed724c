"""Progress for people, attached by default: a tqdm bar in a terminal, and where stderr is not one (a batch job
whose log is a file or a pipe) a plain line every few seconds (ProgressBar), or every `log_every_steps` steps with
the run's label (PlainProgress). Both act on the main process only and read the loss (a device sync) only when they
show it."""

from __future__ import annotations

import sys
import time

from .base import Callback
from .loggers import Throughput, scalar

clock = time.monotonic  # when a plain line is due and the rate it shows (a test puts a fake clock here)


def draws_bars(stream) -> bool:
    """A terminal, or a Jupyter cell's output (not a terminal, but tqdm.auto draws a widget there)."""
    return stream.isatty() or type(stream).__module__.startswith("ipykernel")


class ProgressBar(Callback):
    """A tqdm bar over steps with epoch, loss, lr and samples/s when stderr is a terminal (`disable=False`: always;
    `disable=True`: nothing at all). Where it is not, a line when the run starts or resumes, then one at most every
    `every_s` seconds and at the last step: `step 40/300 (13%), loss 1.234, 2.1 steps/s, about 124 s left`.
    Every run gets one unless a ProgressBar (or PlainProgress) is attached."""

    label = ""

    def __init__(self, every_n_steps: int | None = None, disable: bool | None = None, every_s: float = 10.0,
                 stream=None):
        if not every_s >= 0:
            raise ValueError(f"ProgressBar: every_s must be >= 0 seconds, got {every_s!r}")
        self.every_n_steps, self.disable, self.every_s, self.stream = every_n_steps, disable, every_s, stream
        self.bar, self.plain = None, False  # on_train_end runs even when an earlier callback's on_train_begin raised

    def on_train_begin(self, trainer):
        self.bar, self.plain = None, False
        if not trainer.is_main_process or self.disable is True:
            return
        self.out = self.stream or sys.stderr
        self.total, self.first = trainer.total_steps(), trainer.state.global_step
        self.every = self.every_n_steps or trainer.config.log_every_steps
        self.plain = self.disable is None and not draws_bars(self.out)
        if self.plain or self.label:
            started = f"resumed at step {self.first} of {self.total}" if self.first else f"training {self.total} steps"
            self._print(started)
        self.start = self.last = clock()
        if not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.first, unit="step", file=self.out, disable=False,
                            desc=self.label or None, dynamic_ncols=True)
            self.postfix: dict = {}
            self.throughput = Throughput()

    def on_batch_end(self, trainer, outputs):
        if self.plain:
            self._plain_line(trainer.state.global_step, outputs)
        if self.bar is None:
            return
        self.bar.update(1)
        self.throughput.samples += outputs.get("train/samples", 0)
        if trainer.state.global_step % self.every == 0:
            self.postfix.update(epoch=trainer.state.epoch, samples_s=f"{self.throughput.take():.0f}")
            if "train/loss" in outputs:
                self.postfix["loss"] = f"{scalar(outputs['train/loss']):.4g}"
            if "optim/lr" in outputs:
                self.postfix["lr"] = f"{outputs['optim/lr']:.3g}"
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_epoch_end(self, trainer, logs):
        if self.bar is not None:
            self.postfix.update({k: f"{scalar(v):.4g}" for k, v in logs.items() if k.startswith("val/")})
            self.postfix["epoch"] = trainer.state.epoch
            self.bar.set_postfix(self.postfix)

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def due(self, step: int, now: float) -> bool:
        """Whether a plain line is due after `step`: `every_s` seconds since the last one, and the run's last step."""
        return now - self.last >= self.every_s or step >= self.total

    def _plain_line(self, step: int, outputs: dict) -> None:
        now = clock()
        if not self.due(step, now):
            return
        self.last = now
        rate = (step - self.first) / max(now - self.start, 1e-9)  # steps/s over this fit
        speed = f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/step"
        loss = f", loss {scalar(outputs['train/loss']):.4g}" if "train/loss" in outputs else ""
        self._print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%){loss}, {speed}, "
                    f"about {(self.total - step) / max(rate, 1e-9):.0f} s left")

    def _print(self, line: str) -> None:
        print(f"{self.label}: {line}" if self.label else line, file=self.out, flush=True)


class PlainProgress(ProgressBar):
    """A ProgressBar for one labelled run of several (a paper's rows): the label on the bar and on every line, a
    line when the run starts or resumes even in a terminal, and, where stderr is not a terminal, a plain line every
    `log_every_steps` steps (and at the last) instead of every few seconds, so a batch job's log lines up with
    its metrics."""

    def __init__(self, label: str, stream=None, disable: bool | None = None):
        super().__init__(disable=disable, stream=stream)
        self.label = label

    def due(self, step: int, now: float) -> bool:
        return step % self.every == 0 or step >= self.total

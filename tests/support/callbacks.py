"""Callbacks the tests attach, in every room and in the worker scripts: `Recorder` writes down every hook call,
`KillAt` kills the process at a step (a preempted node), `StopAt` stops the run at a step the way a preemption with
a grace period does (the one way to stop a run at step k), `TrainedPrompts` appends each trained step's prompt indices
to a file (across kills and resumes)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from paperloop.callbacks import Callback
from paperloop.callbacks.guards import checkpoint_and_stop


class Recorder(Callback):
    """Records every hook call as (hook, epoch, global_step)."""

    def __init__(self):
        self.calls = []

    def _rec(self, name, trainer):
        self.calls.append((name, trainer.state.epoch, trainer.state.global_step))

    def on_train_begin(self, trainer): self._rec("on_train_begin", trainer)
    def on_epoch_begin(self, trainer): self._rec("on_epoch_begin", trainer)
    def on_batch_begin(self, trainer, step): self._rec("on_batch_begin", trainer)
    def on_batch_end(self, trainer, outputs): self._rec("on_batch_end", trainer)
    def on_epoch_end(self, trainer, logs): self._rec("on_epoch_end", trainer)
    def on_train_end(self, trainer): self._rec("on_train_end", trainer)


class KillAt(Callback):
    """Sends `sig` (default SIGKILL: no cleanup at all, like a preempted node) to this process in `hook`
    when `global_step == step`; with `rank`, only in the process of that rank."""

    def __init__(self, step: int, hook: str = "on_batch_begin", sig=signal.SIGKILL, rank: int | None = None):
        self.step, self.hook, self.sig, self.rank = step, hook, sig, rank

    def _maybe_kill(self, trainer, hook):
        if hook == self.hook and trainer.state.global_step == self.step and self.rank in (None, trainer.rank):
            os.kill(os.getpid(), self.sig)

    def on_epoch_begin(self, trainer): self._maybe_kill(trainer, "on_epoch_begin")
    def on_batch_begin(self, trainer, step): self._maybe_kill(trainer, "on_batch_begin")
    def on_batch_end(self, trainer, outputs): self._maybe_kill(trainer, "on_batch_end")


class StopAt(Callback):
    """Asks the run to stop after the step that makes `global_step == step`, as a preemption does: a resumable
    stop, which `fit(resume=...)` undoes. The run's last checkpoint is then whichever its own schedule wrote
    (`checkpoint_every_steps`, a ModelCheckpoint); with `checkpoint=True` one is written at this step first, by
    `checkpoint_and_stop`, what the SIGTERM guard does. `resumable=False`: a stop that ends the run for good."""

    def __init__(self, step: int, *, checkpoint: bool = False, resumable: bool = True,
                 reason: str = "test preemption"):
        if checkpoint and not resumable:
            raise ValueError("StopAt: checkpoint=True is a resumable stop (checkpoint_and_stop)")
        self.step, self.checkpoint, self.resumable, self.reason = step, checkpoint, resumable, reason

    def on_batch_end(self, trainer, outputs):
        if trainer.state.global_step != self.step:
            return
        if self.checkpoint:
            checkpoint_and_stop(trainer, self.reason)
        else:
            trainer.request_stop(self.reason, resumable=self.resumable)


class TrainedPrompts(Callback):
    """Appends {"step", "indices"} to `path` after each step is trained (a JSON line, flushed): over a run killed and
    resumed several times, the last line of each step is what the final weights trained on (`trained_prompts`)."""

    def __init__(self, path):
        self.path, self.indices = Path(path), None

    def on_batch_begin(self, trainer, step):
        self.indices = [int(i) for micro_batch in step.micro_batches for i in micro_batch]

    def on_batch_end(self, trainer, outputs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.state.global_step, "indices": self.indices}) + "\n")


def trained_prompts(path) -> list[int]:
    """The prompt indices the run recorded by `TrainedPrompts` trained on, sorted (a multiset): a step written again
    by a resumed run replaces what a killed one wrote for it."""
    steps = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["indices"]
    return sorted(i for indices in steps.values() for i in indices)

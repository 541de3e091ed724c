"""Guards: stop on a non-finite loss; on SIGTERM/SIGINT or at a time limit, checkpoint and stop so a
resume loses nothing."""

from __future__ import annotations

import logging
import signal
import threading
import time

from .base import Callback

log = logging.getLogger(__name__)


def checkpoint_and_stop(trainer, reason: str, interrupt: bool = False):
    """Checkpoint, then stop in a way a resume undoes: the run is interrupted, not finished (`interrupt`: by the
    user, so fit() raises KeyboardInterrupt once it has ended). An async checkpoint is committed before the run
    stops: train() waits for it before on_train_end. Returns the checkpoint's path."""
    path = trainer.save_checkpoint()
    trainer.request_stop(reason, resumable=True, interrupt=interrupt)
    return path


class TerminateOnNonFinite(Callback):
    """Stop at the first step whose loss or gradient is NaN or infinite. The trainer never applies such
    an update, so the weights (and any checkpoint written after) are those of the last finite one."""

    def on_batch_end(self, trainer, outputs):
        if not outputs.get("train/finite", True):
            trainer.request_stop(f"non-finite loss or gradient at step {trainer.state.global_step}; "
                                 "it was not applied")


class SignalCheckpoint(Callback):
    """On SIGTERM or SIGINT (a preemption, a Ctrl-C): finish the current step, write a checkpoint, and stop with
    reason "signal" (`state.interrupted` is then True), saying so in a warning; `fit(resume="latest")` then continues
    exactly. After a SIGINT, fit() raises KeyboardInterrupt once the run has ended (checkpoint committed,
    `on_train_end` run): the script stops, as a Ctrl-C should, instead of going on as if training had finished. After
    a SIGTERM, fit() returns (a scheduler's preemption: the script may requeue itself). A second signal of the same
    kind gets the default behaviour. The trainer attaches one unless you do."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received, self._previous = None, {}  # on_train_end runs even when an earlier on_train_begin raised

    def on_train_begin(self, trainer):
        self.received, self._previous = None, {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("SignalCheckpoint: fit() is not on the main thread, so signals cannot be caught")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one is not ignored

    def on_batch_end(self, trainer, outputs):
        self._maybe_stop(trainer)

    def on_epoch_end(self, trainer, logs):
        self._maybe_stop(trainer)

    def _maybe_stop(self, trainer):
        # Every process must take the same decision at the same step, or the next collective hangs.
        if trainer.any_process(self.received is not None):
            ctrl_c = trainer.any_process(self.received == signal.SIGINT)
            name = signal.Signals(self.received).name if self.received is not None else "a signal to another process"
            path = checkpoint_and_stop(trainer, "signal", interrupt=ctrl_c)
            if trainer.is_main_process:
                log.warning("%s: the run stops after step %d, checkpointed in %s; fit(resume='latest') continues it%s",
                            name, trainer.state.global_step, path,
                            " (fit() raises KeyboardInterrupt once the checkpoint is written)" if ctrl_c else "")
            self.received = None

    def on_train_end(self, trainer):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class TimeLimit(Callback):
    """Checkpoint and stop once `seconds` of wall time have passed in this fit() (checked after each
    step), e.g. to end inside a cluster job's limit; `fit(resume="latest")` continues."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"TimeLimit: seconds must be > 0, got {seconds}")
        self.seconds = seconds

    def on_train_begin(self, trainer):
        self.deadline = time.monotonic() + self.seconds

    def on_batch_end(self, trainer, outputs):
        # Processes read their own clocks: they agree on the step to stop at through any_process.
        if trainer.any_process(time.monotonic() >= self.deadline):
            checkpoint_and_stop(trainer, f"time limit of {self.seconds:g} s")

"""EarlyStopping: stop when a monitored metric has not improved for `patience` epochs (Keras semantics)."""

from __future__ import annotations

import logging
import math

from .base import Callback

log = logging.getLogger(__name__)


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Does `value` beat `best` by more than `min_delta`?  No best yet: any finite value does."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def missing_monitor(monitor: str, metrics: dict) -> bool:
    """Is `monitor` absent from metrics that hold others of its kind (a `val/` key when it is `val/...`)?
    Then it is misspelt, not merely not computed this time."""
    if monitor in metrics:
        return False
    prefix = monitor.split("/")[0] + "/" if "/" in monitor else ""
    return any(k.startswith(prefix) for k in metrics if k != "epoch")


def warn_missing_monitor(owner: str, monitor: str, metrics: dict) -> None:
    keys = sorted(k for k in metrics if k != "epoch")
    log.warning("%s: the monitored metric %r is not in the logs; they hold %s", owner, monitor, keys)


class EarlyStopping(Callback):
    """An epoch improves when `monitor` in its logs beats the best so far (or `baseline`) by more than
    `min_delta`; after `patience` epochs in a row without improvement, training stops. Epochs whose
    logs lack `monitor` (no validation that epoch) are not counted; a monitor that is missing while
    others of its kind are there (a typo) is warned about once. With `stopping_threshold`, training stops
    as soon as `monitor` reaches it (>= in mode "max", <= in "min"), e.g. validation accuracy 99%. With
    `restore_best`, the weights of the best epoch are put back when it stops. `best` is the best value
    so far (None before the first). A `val/` monitor in a run that never validates at an epoch's end (no
    `val_data`, or `val_every=0`) is refused as the run starts."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0,
                 baseline: float | None = None, restore_best: bool = False, stopping_threshold: float | None = None):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be >= 1, got {patience}")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.baseline, self.restore_best = abs(min_delta), baseline, restore_best
        self.stopping_threshold = stopping_threshold
        self.state_key = f"{self.state_key}[{monitor}]"  # two of them, on two metrics, keep apart
        self._reset()  # counters exist before a run too: a trainer's state_dict() may be taken any time

    def on_train_begin(self, trainer):
        self._reset()
        if self.monitor.startswith("val/"):
            never = "there is no val_data" if trainer.val_data is None else \
                "val_every=0" if trainer.config.val_every == 0 else None
            if never:  # no epoch's logs will hold the monitor: the run would go on to its end, stopping never
                raise ValueError(f"EarlyStopping: monitors {self.monitor!r}, which no epoch's logs will hold: "
                                 f"{never}, so it could never stop the run. Pass val_data (validated at epoch ends), "
                                 "or monitor a metric the epoch logs hold (e.g. 'train/loss')")

    def _reset(self):
        self.best, self.wait, self.best_weights, self.warned = self.baseline, 0, None, False

    def on_epoch_end(self, trainer, logs):
        if self.monitor not in logs:
            if not self.warned and missing_monitor(self.monitor, logs):
                warn_missing_monitor("EarlyStopping", self.monitor, logs)
                self.warned = True
            return
        value = float(logs[self.monitor])
        if self.stopping_threshold is not None and not math.isnan(value) and (
                value >= self.stopping_threshold if self.mode == "max" else value <= self.stopping_threshold):
            trainer.request_stop(f"early stopping: {self.monitor} reached {value:g} (threshold "
                                 f"{self.stopping_threshold:g}) at epoch {trainer.state.epoch}")
            return
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            if self.restore_best:
                self.best_weights = {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            if self.best_weights is not None:
                trainer.unwrapped_model.load_state_dict(self.best_weights)
            trainer.request_stop(f"early stopping: {self.monitor} did not improve for {self.patience} "
                                 f"epoch(s); best {self.best}")

    def state_dict(self):
        return {"best": self.best, "wait": self.wait, "best_weights": self.best_weights}

    def load_state_dict(self, state):
        self.best, self.wait, self.best_weights = state["best"], state["wait"], state["best_weights"]

"""ModelCheckpoint: decides when to write a checkpoint and which ones to keep."""

from __future__ import annotations

from .base import Callback
from .early_stopping import missing_monitor, warn_missing_monitor


class ModelCheckpoint(Callback):
    """Write a checkpoint every `every_n_steps` steps and/or every `every_n_epochs` epochs, and at the
    end of training (`save_last`). Keep the `keep_last` newest and, when `monitor` is set, the
    `save_top_k` best by it (`mode`); remove the rest once a newer checkpoint is committed.

    At most one checkpoint per step: a step checkpoint that falls on the last step of an epoch is
    written when the epoch closes, right after (so it holds the closed epoch), together with the epoch's
    own; the run's last one is not written again at its end. Checkpoints go to `trainer.checkpoint_dir`
    as `step-000123`; `fit(resume="latest")` finds them through the folder's index, never by parsing
    these names.
    """

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = 1, monitor: str | None = None,
                 mode: str = "min", save_top_k: int = 1, save_last: bool = True, keep_last: int = 3):
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint: mode must be 'min' or 'max', got {mode!r}")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"ModelCheckpoint: {name} must be >= 1 or None, got {value}")
        if keep_last < 1 or save_top_k < 0:
            raise ValueError("ModelCheckpoint: keep_last must be >= 1 and save_top_k >= 0")
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.save_last, self.keep_last = save_last, keep_last
        if monitor is not None:
            self.state_key = f"{self.state_key}[{monitor}]"
        self._reset()  # counters exist before a run too: a trainer's state_dict() may be taken any time

    def on_train_begin(self, trainer):
        self._reset()

    def _reset(self):
        self.recent: list[str] = []  # newest last
        self.best: list[tuple[float, str]] = []  # best first
        self.saved: list[str] = []  # every checkpoint this callback wrote and has not removed
        self.warned = False
        self.owed = False  # a step checkpoint deferred to the epoch's close, which follows in the same step

    def on_batch_end(self, trainer, outputs):
        if self.every_n_steps and trainer.state.global_step % self.every_n_steps == 0:
            if trainer.plan.epoch_done():  # the loop closes the epoch next, whatever stops the run
                self.owed = True
            else:
                self._save(trainer, outputs)

    def _epoch_due(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    def on_epoch_end(self, trainer, logs):
        if self.owed or self._epoch_due(trainer.state.epoch):
            self._save(trainer, logs)
        self.owed = False

    def on_train_end(self, trainer):
        if self.save_last and trainer.error is None and trainer.state.global_step > 0 \
                and not trainer.has_current_checkpoint():
            self._save(trainer, {})

    def _save(self, trainer, metrics: dict):
        doomed: list[str] = []  # filled below, once the lists hold this save
        path = trainer.save_checkpoint(on_commit=lambda p: self._prune(trainer, doomed))
        if path.name not in self.saved:
            self.saved.append(path.name)
            self.recent = (self.recent + [path.name])[-self.keep_last:]
        if self.monitor and self.monitor in metrics:
            value = float(metrics[self.monitor])
            ranked = sorted(self.best + [(value, path.name)], key=lambda vp: vp[0], reverse=self.mode == "max")
            self.best = ranked[: self.save_top_k]
        elif self.monitor and not self.warned and missing_monitor(self.monitor, metrics):
            warn_missing_monitor("ModelCheckpoint", self.monitor, metrics)
            self.warned = True
        keep = set(self.recent) | {name for _, name in self.best}
        doomed += [name for name in self.saved if name not in keep]

    def _prune(self, trainer, doomed: list[str]):
        """Remove our checkpoints that are neither recent nor best; only after a newer one is committed.
        What goes is decided when that one is asked for: an async save's commit is seen steps later, when the
        lists may hold a newer save still being written, and its own predecessor must stay until it lands."""
        for name in [n for n in doomed if n in self.saved]:
            trainer.remove_checkpoint(name)
            self.saved.remove(name)

    def state_dict(self):
        return {"recent": self.recent, "best": [list(vp) for vp in self.best], "saved": self.saved}

    def load_state_dict(self, state):
        self.recent = list(state["recent"])
        self.best = [(float(v), name) for v, name in state["best"]]
        self.saved = list(state["saved"])

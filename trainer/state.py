"""TrainState: the counters and histories of a run, checkpointed as plain JSON."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs; also the index of the epoch in progress
    global_step: int = 0  # loop steps taken: one hook cycle each, and the checkpoint boundary
    step_in_epoch: int = 0  # loop steps taken in the epoch in progress
    # Optimizer updates applied (a skipped non-finite update does not count). Supervised training makes one
    # per step; a trainer that makes several per step (RL: a pass over minibatches) counts each here.
    updates: int = 0
    train_loss_history: list[float] = field(default_factory=list)  # mean train loss per completed epoch
    # The last step's train loss (its weighted mean over the step); None before the first. A run shorter than an
    # epoch has no train_loss_history yet, and this is its loss.
    last_loss: Optional[float] = None
    val_history: list[dict] = field(default_factory=list)  # one dict per validation, with epoch and step
    should_stop: bool = False
    stop_reason: Optional[str] = None
    # A stop that a resume should undo (a signal, a time limit), as opposed to one that ends the run
    # (early stopping, a non-finite loss).
    stop_resumable: bool = False
    # Names this run (a fresh fit draws one; a resume keeps the checkpoint's), so the run can tell the
    # checkpoints it wrote from another run's in the same folder.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def interrupted(self) -> bool:
        """Did the run stop for a reason a resume undoes (a signal, a time limit), rather than finish?"""
        return self.should_stop and self.stop_resumable

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        """The state `to_dict` gave, checked (a checkpoint is data): a ValueError names a field that is unknown, of
        another type, or out of range (a step count below 0, more epochs or steps in the epoch than steps)."""
        if not isinstance(d, dict):
            raise ValueError(f"TrainState: a mapping of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainState: unknown fields {sorted(unknown)}")
        state = cls(**d)
        state.check()
        return state

    def check(self) -> None:
        """Raise a ValueError naming the first field out of range or of another type."""
        for name in ("epoch", "global_step", "step_in_epoch", "updates"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"TrainState: {name} is {value!r}, not a count (an integer >= 0)")
        # Every epoch holds a step, and a step counts once in its epoch: neither can pass the run's steps.
        for name in ("epoch", "step_in_epoch"):
            if getattr(self, name) > self.global_step:
                raise ValueError(f"TrainState: {name} is {getattr(self, name)}, more than the {self.global_step} "
                                 "steps the run took")
        for name, kind in (("train_loss_history", list), ("val_history", list), ("should_stop", bool),
                           ("stop_resumable", bool), ("run_id", str), ("stop_reason", (str, type(None))),
                           ("last_loss", (float, type(None)))):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"TrainState: {name} is a {type(getattr(self, name)).__name__}")

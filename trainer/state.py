"""TrainState: the counters and histories of a run, checkpointed as plain JSON."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs; also the index of the epoch in progress
    global_step: int = 0  # optimizer steps taken
    step_in_epoch: int = 0  # optimizer steps taken in the epoch in progress
    train_loss_history: list[float] = field(default_factory=list)  # mean train loss per completed epoch
    val_history: list[dict] = field(default_factory=list)  # one dict per validation, with epoch and step
    best_metric: Optional[float] = None  # the early-stopping monitor's best value so far
    should_stop: bool = False
    stop_reason: Optional[str] = None
    # A stop that a resume should undo (a signal, a time limit), as opposed to one that ends the run
    # (early stopping, a non-finite loss).
    stop_resumable: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # new per fresh run, kept by a resume

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainState: unknown fields {sorted(unknown)}")
        return cls(**d)

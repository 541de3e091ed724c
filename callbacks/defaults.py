"""The callbacks a config asks for (`early_stopping_patience`, `checkpoint_every_steps`, `time_limit_s`) and
the ones every run gets (`ProgressBar`, `SignalCheckpoint`, `JSONLLogger`), where the user has not attached one of
that kind."""

from __future__ import annotations

from .base import Callback
from .early_stopping import EarlyStopping
from .guards import SignalCheckpoint, TimeLimit
from .jsonl import JSONLLogger
from .model_checkpoint import ModelCheckpoint
from .progress import ProgressBar


def default_callbacks(config, attached) -> list[Callback]:
    """The callbacks the config asks for, where the user has not attached one of that kind."""
    has = lambda kind: any(isinstance(cb, kind) for cb in attached)  # noqa: E731
    extra: list[Callback] = []
    if config.early_stopping_patience and not has(EarlyStopping):
        extra.append(EarlyStopping(config.early_stopping_monitor, config.early_stopping_mode,
                                   config.early_stopping_patience))
    if config.checkpoint_every_steps and not has(ModelCheckpoint):
        extra.append(ModelCheckpoint(every_n_steps=config.checkpoint_every_steps, every_n_epochs=None))
    if config.time_limit_s and not has(TimeLimit):
        extra.append(TimeLimit(config.time_limit_s))
    if not has(ProgressBar):  # a long run is never silent: a bar in a terminal, plain lines in a log file
        extra.append(ProgressBar())
    if not has(SignalCheckpoint):
        extra.append(SignalCheckpoint())
    if not has(JSONLLogger):  # last: should it raise at the run's end, the others' on_train_end ran
        extra.append(JSONLLogger())
    return extra

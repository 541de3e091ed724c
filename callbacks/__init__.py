"""Callbacks: the six-hook Callback base and the stock callbacks."""

from .base import HOOKS, Callback, LambdaCallback
from .early_stopping import EarlyStopping
from .guards import SignalCheckpoint, TerminateOnNonFinite, TimeLimit
from .jsonl import JSONLLogger
from .loggers import StepLogger, TensorBoardLogger
from .progress import PlainProgress, ProgressBar
from .model_checkpoint import ModelCheckpoint
from .trackers import TrackioLogger, WandbLogger  # the trackers themselves are imported when a run begins

__all__ = ["HOOKS", "Callback", "LambdaCallback", "EarlyStopping", "ModelCheckpoint", "StepLogger", "TensorBoardLogger",
           "JSONLLogger", "ProgressBar", "PlainProgress", "TerminateOnNonFinite", "SignalCheckpoint", "TimeLimit",
           "WandbLogger", "TrackioLogger"]

"""Callbacks: the six-hook Callback base and the stock callbacks."""

from .base import HOOKS, Callback, LambdaCallback
from .early_stopping import EarlyStopping
from .guards import SignalCheckpoint, TerminateOnNonFinite, TimeLimit
from .loggers import TensorBoardLogger
from .progress import PlainProgress, ProgressBar
from .model_checkpoint import ModelCheckpoint

__all__ = ["HOOKS", "Callback", "LambdaCallback", "EarlyStopping", "ModelCheckpoint", "TensorBoardLogger",
           "ProgressBar", "PlainProgress", "TerminateOnNonFinite", "SignalCheckpoint", "TimeLimit"]

"""paperloop: a training framework for reproducing ML papers.

    from paperloop import BaseTrainer, TrainerConfig
    from paperloop.callbacks import EarlyStopping, TensorBoardLogger

This package is the `trainer/` folder; `paperloop.callbacks`, `paperloop.models` and `paperloop.papers`
are the `callbacks/`, `models/` and `papers/` folders (mapped in pyproject.toml).
"""

from .base import BaseTrainer
from .checkpoint import CheckpointError
from .config import ConfigError, TrainerConfig, load_config
from .rl_trainer import RLConfig, RLTrainer
from .state import TrainState

__all__ = ["BaseTrainer", "TrainerConfig", "TrainState", "load_config", "ConfigError", "CheckpointError", "RLTrainer",
           "RLConfig"]

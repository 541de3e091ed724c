"""The paperloop engine: BaseTrainer, its config and state, checkpoint I/O and resumable data order."""

from .base import BaseTrainer
from .checkpoint import CheckpointError
from .config import ConfigError, TrainerConfig, load_config
from .state import TrainState

__all__ = ["BaseTrainer", "TrainerConfig", "TrainState", "load_config", "ConfigError", "CheckpointError"]

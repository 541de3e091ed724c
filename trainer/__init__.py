"""paperloop: a training framework for reproducing ML papers.

    from paperloop import BaseTrainer, TrainerConfig
    from paperloop import SFTTrainer, SFTConfig          # supervised fine-tuning of causal LMs
    from paperloop import RLTrainer, RLConfig            # GRPO-family policy gradient, programmatic rewards
    from paperloop.callbacks import EarlyStopping, TensorBoardLogger

This package is the `trainer/` folder; `paperloop.callbacks`, `paperloop.models` and `paperloop.papers`
are the `callbacks/`, `models/` and `papers/` folders (mapped in pyproject.toml).
"""

from .base import BaseTrainer
from .checkpoint import CheckpointError
from .config import ConfigError, TrainerConfig, load_config
from .lora import LoraSettings
from .rl_trainer import RLConfig, RLTrainer
from .sft import SFTConfig, SFTTrainer
from .state import TrainState

__all__ = ["BaseTrainer", "TrainerConfig", "TrainState", "load_config", "ConfigError", "CheckpointError",
           "SFTTrainer", "SFTConfig", "LoraSettings", "RLTrainer", "RLConfig"]

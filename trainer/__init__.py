"""paperloop: a training framework for reproducing ML papers.

    from paperloop import BaseTrainer, TrainerConfig
    from paperloop import SFTTrainer, SFTConfig          # supervised fine-tuning of causal LMs (paperloop.lm)
    from paperloop import RLTrainer, RLConfig            # GRPO-family RL with programmatic rewards (paperloop.rl)
    from paperloop import DPOTrainer, DPOConfig          # preference optimization, the DPO family (paperloop.preference)
    from paperloop.callbacks import EarlyStopping, TensorBoardLogger

This package is the `trainer/` folder: the engine at its root (the loop, steps and schedules, plans, evaluation,
config, state, checkpoints, distributed set-up, lock, seeds and RNG, time limits, CLI), and two rooms, `lm/`
(`paperloop.lm`) and `rl/` (`paperloop.rl`). Imports run one way: rl -> lm -> engine; the engine knows no language
model (how a model's weights are written and read is the trainer's: `write_weights`, `load_weights`). `paperloop.callbacks`, `paperloop.models` and
`paperloop.papers` are the `callbacks/`, `models/` and `papers/` folders (mapped in pyproject.toml).
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

from .config import ConfigError, TrainerConfig, load_config
from .state import TrainState

# One source of truth: the version in pyproject.toml, as the installed distribution records it.
try:
    __version__ = _version("paperloop")
except _NotInstalled:  # run from a source tree that was never installed
    __version__ = "(not installed)"

# Names that import torch load on first use: `paperloop --help` (every `paperloop.*` module runs this file first)
# answers without importing torch, and `import paperloop` for an MLP does not import transformers.
_LAZY = {"BaseTrainer": "base", "CheckpointError": "checkpoint", "Weighted": "evaluation",
         "SFTTrainer": "lm", "SFTConfig": "lm", "LMTrainer": "lm", "LMConfig": "lm", "LoraSettings": "lm",
         "RLTrainer": "rl", "RLConfig": "rl", "DPOTrainer": "preference", "DPOConfig": "preference"}

__all__ = ["TrainerConfig", "TrainState", "load_config", "ConfigError", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

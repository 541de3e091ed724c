"""Run configuration: frozen dataclasses filled from YAML and `key=value` overrides by OmegaConf.

    cfg = load_config(TrainerConfig, "papers/mnist1d/config.yaml", ["lr=3e-4", "max_epochs=5"])

A paper extends `TrainerConfig` by subclassing it (a frozen dataclass too), so one flat set of keys
holds both the engine's and the paper's settings. An unknown key, a value of the wrong type or an
out-of-range value raises `ConfigError`, whose message names the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message starts with the key."""


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; stops mid-epoch when reached first
    batch_size: int = 32  # per process and per micro-batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    output_dir: str = "runs/default"
    grad_accum_steps: int = 1
    max_grad_norm: Optional[float] = None
    precision: str = "32"  # "32" or "bf16"
    shuffle: bool = True
    val_every: Optional[int] = None  # epochs; None: every epoch when val_data is given; 0: never
    val_every_steps: Optional[int] = None  # optimizer steps, in addition to val_every
    log_every_steps: int = 50
    checkpoint_every_steps: Optional[int] = None  # installs a ModelCheckpoint when none is attached
    early_stopping_patience: Optional[int] = None  # installs an EarlyStopping when none is attached
    early_stopping_monitor: str = "val/loss"
    early_stopping_mode: str = "min"

    def __post_init__(self):
        _check_range(self, positive=("max_epochs", "batch_size", "grad_accum_steps", "log_every_steps"),
                     positive_or_none=("max_steps", "val_every_steps", "checkpoint_every_steps",
                                       "early_stopping_patience", "max_grad_norm"),
                     non_negative=("lr", "weight_decay"))
        if self.val_every is not None and self.val_every < 0:
            raise ConfigError(f"val_every: must be >= 0 (0 turns validation off), got {self.val_every}")
        if self.precision not in ("32", "bf16"):
            raise ConfigError(f"precision: must be '32' or 'bf16', got {self.precision!r}")
        if self.early_stopping_mode not in ("min", "max"):
            raise ConfigError(f"early_stopping_mode: must be 'min' or 'max', got {self.early_stopping_mode!r}")


def _check_range(cfg, positive=(), positive_or_none=(), non_negative=()):
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(cfg, key)}")
    for key in positive_or_none:
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0 or null, got {getattr(cfg, key)}")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(cfg, key)}")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build `cls` from its defaults, then the YAML file at `path`, then `key=value` overrides."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key=value")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(cls),
            OmegaConf.load(path) if path is not None else {},
            OmegaConf.from_dotlist(list(overrides)),
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def config_to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

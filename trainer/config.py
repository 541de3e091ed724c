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


SCHEDULES = ("constant", "linear", "cosine", "cosine_with_min_lr")  # the config's lr_scheduler names


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message starts with the key."""


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: Optional[int] = None  # None: 1, or as many as max_steps needs when that is set
    max_steps: Optional[int] = None  # loop steps; with max_epochs set too, whichever comes first
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
    lr_scheduler: str = "constant"  # constant | linear | cosine | cosine_with_min_lr (transformers.get_scheduler)
    warmup_steps: int = 0  # optimizer updates of linear warmup from 0 to lr
    warmup_ratio: float = 0.0  # or warmup as a fraction of all updates (not both)
    min_lr_ratio: float = 0.0  # cosine_with_min_lr: the floor, as a fraction of lr

    def __post_init__(self):
        _check_range(self, positive=("batch_size", "grad_accum_steps", "log_every_steps"),
                     positive_or_none=("max_epochs", "max_steps", "val_every_steps", "checkpoint_every_steps",
                                       "early_stopping_patience", "max_grad_norm"),
                     non_negative=("lr", "weight_decay", "warmup_steps", "warmup_ratio", "min_lr_ratio"))
        if self.lr_scheduler not in SCHEDULES:
            raise ConfigError(f"lr_scheduler: must be one of {', '.join(SCHEDULES)}, got {self.lr_scheduler!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError(f"warmup_ratio: set to {self.warmup_ratio} with warmup_steps={self.warmup_steps}; "
                              "set one of them")
        if self.warmup_ratio >= 1 or self.min_lr_ratio > 1:
            raise ConfigError(f"{'warmup_ratio' if self.warmup_ratio >= 1 else 'min_lr_ratio'}: must be a fraction "
                              "below 1")
        if self.val_every is not None and self.val_every < 0:
            raise ConfigError(f"val_every: must be >= 0 (0 turns validation off), got {self.val_every}")
        if self.precision not in ("32", "bf16"):
            raise ConfigError(f"precision: must be '32' or 'bf16', got {self.precision!r}")
        if self.early_stopping_mode not in ("min", "max"):
            raise ConfigError(f"early_stopping_mode: must be 'min' or 'max', got {self.early_stopping_mode!r}")


    def epoch_limit(self) -> Optional[int]:
        """The epochs the run may take: max_epochs, else 1 unless max_steps alone decides (None)."""
        if self.max_epochs is not None:
            return self.max_epochs
        return None if self.max_steps is not None else 1


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

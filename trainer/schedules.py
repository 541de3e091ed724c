"""Learning-rate schedules: the config's named ones (through `transformers.get_scheduler`), and what a
trainer's `configure_scheduler` may return.

    lr_scheduler: cosine      # constant | linear | cosine | cosine_with_min_lr
    warmup_steps: 100         # or warmup_ratio: 0.05 (of all optimizer updates)
    min_lr_ratio: 0.1         # cosine_with_min_lr: the floor, as a fraction of lr

`configure_scheduler` returns a scheduler (stepped once per optimizer update), None, or a dict
`{"scheduler": s, "interval": "step" | "epoch", "monitor": "val/loss"}`: "epoch" steps it when an epoch
closes, after its validation; a `ReduceLROnPlateau` is stepped with the monitored metric then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass(frozen=True)
class Schedule:
    scheduler: object | None
    interval: str = "step"  # "step": after every optimizer update; "epoch": when an epoch closes
    monitor: str | None = None  # the metric a ReduceLROnPlateau steps with


def warmup_updates(config, total_updates: int) -> int:
    return int(round(config.warmup_ratio * total_updates)) if config.warmup_ratio else config.warmup_steps


def config_scheduler(optimizer: torch.optim.Optimizer, config, total_updates: int):
    """The config's `lr_scheduler` with its warmup, or None when the learning rate is constant."""
    from transformers import get_scheduler  # imports transformers' optimization module: only when used

    name, warmup = config.lr_scheduler, warmup_updates(config, total_updates)
    if name == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup) if warmup else None
    if warmup >= total_updates:
        raise ConfigError(f"warmup_steps: {warmup} warmup updates leave none of the run's {total_updates} to "
                          f"the {name} schedule")
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": config.min_lr_ratio}} if name == "cosine_with_min_lr" else {}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_updates, **extra)


def as_schedule(result, owner: str) -> Schedule:
    """What `configure_scheduler` returned, checked, or an error saying what to return instead."""
    if result is None:
        return Schedule(None)
    if not isinstance(result, dict):
        result = {"scheduler": result}
    unknown = set(result) - {"scheduler", "interval", "monitor"}
    if unknown or "scheduler" not in result:
        raise TypeError(f"{owner}.configure_scheduler returned a dict with keys {sorted(result)}; expected "
                        "'scheduler' and optionally 'interval' ('step' or 'epoch') and 'monitor'")
    scheduler, monitor = result["scheduler"], result.get("monitor")
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    interval = result.get("interval", "epoch" if plateau else "step")
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "state_dict"):
        raise TypeError(f"{owner}.configure_scheduler returned a {type(scheduler).__name__}, not an LR scheduler")
    if interval not in ("step", "epoch"):
        raise ValueError(f"{owner}.configure_scheduler: interval must be 'step' or 'epoch', got {interval!r}")
    if plateau and (monitor is None or interval != "epoch"):
        raise ValueError(f"{owner}.configure_scheduler: a ReduceLROnPlateau steps on a metric once an epoch "
                         "closes; return {'scheduler': s, 'interval': 'epoch', 'monitor': 'val/loss'}")
    if monitor is not None and not plateau:
        raise ValueError(f"{owner}.configure_scheduler: 'monitor' is for ReduceLROnPlateau; a "
                         f"{type(scheduler).__name__} steps without a metric")
    return Schedule(scheduler, interval, monitor)

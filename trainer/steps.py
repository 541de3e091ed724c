"""Pieces of a training step that hold no trainer state, or only their own: the default optimizer and its
learning-rate schedule, what a loss function returns, the mean of micro-batches' metrics, the finiteness check
every update runs, the gradient norm, and the open epoch's running loss.

Schedules: the config's named ones (through `transformers.get_scheduler`), and what a trainer's
`configure_scheduler` may return:

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


def adamw(params, lr: float, weight_decay: float = 0.0, **options) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where the parameters' device has one (CPU and CUDA do): one kernel for
    every parameter instead of a dozen small ops each, 3-4x faster a step for small models here (the update is
    the same AdamW; transformers' Trainer defaults to the fused one too). Elsewhere the plain loop."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, **options)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **options)


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

def as_outputs(result, owner: str) -> dict:
    """training_step's result as a dict with a scalar "loss" tensor, or a clear error."""
    loss = result.get("loss") if isinstance(result, dict) else result
    if not isinstance(loss, torch.Tensor):
        keys = f" with keys {sorted(result)}" if isinstance(result, dict) else ""
        raise TypeError(f"{owner}.training_step must return a loss tensor or a dict with a 'loss' tensor; "
                        f"got {type(result).__name__}{keys}")
    if loss.ndim != 0:
        raise ValueError(f"{owner}.training_step returned a loss of shape {tuple(loss.shape)}; reduce it to a scalar")
    return result if isinstance(result, dict) else {"loss": result}


def weighted_mean(parts: list[dict], shares: list[float]) -> dict:
    """Per-key weighted mean of micro-batches' outputs (numbers and scalar tensors; others: the last)."""
    total = sum(shares)
    out = dict(parts[-1])
    for key, value in out.items():
        if isinstance(value, (torch.Tensor, float, int)) and not isinstance(value, bool):
            out[key] = sum(p[key] * s for p, s in zip(parts, shares)) / total
    return out


class FiniteCheck:
    """`check(loss)`: are the loss and every gradient finite? Runs every update, so it is lean: one fused
    kernel per dtype of the parameters (the check torch's GradScaler runs, here at scale 1, which leaves
    the values bitwise as they are; a fraction of a norm's cost) and one host sync. Parameters spread
    over several devices fall back to a gradient norm."""

    def __init__(self, params: list[torch.Tensor], device: torch.device):
        self.by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            self.by_dtype.setdefault(p.dtype, []).append(p)
        self.params, self.one_device = params, all(p.device == device for p in params)
        self.found, self.one = torch.zeros(1, device=device), torch.ones(1, device=device)

    def __call__(self, loss: torch.Tensor) -> bool:
        if not self.one_device:
            return bool(torch.isfinite(loss + grad_norm(self.params)))
        self.found.zero_()
        for dtype, params in self.by_dtype.items():
            tensors = [p.grad for p in params if p.grad is not None]
            if dtype == loss.dtype:
                tensors.append(loss.reshape(1))
            if tensors:
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, self.found, self.one)
        if loss.dtype not in self.by_dtype:
            torch._amp_foreach_non_finite_check_and_unscale_([loss.reshape(1)], self.found, self.one)
        return not bool(self.found)


def grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' total L2 norm. torch's get_total_norm groups tensors by device and dtype first,
    which costs more than the norm itself for small models; one device is the common case."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if len({(g.device, g.dtype) for g in grads}) > 1 or hasattr(grads[0], "full_tensor"):  # or FSDP's DTensors
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class EpochLoss:
    """The open epoch's weighted loss: a sum kept as a tensor on the device, so no step waits for it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sum, self.weight = torch.zeros((), device=self.device), 0.0

    def add(self, loss: torch.Tensor, weight: float) -> None:
        self.sum, self.weight = torch.add(self.sum, loss, alpha=weight), self.weight + weight

    def mean(self) -> float:
        return float(self.sum) / self.weight if self.weight else float("nan")

    def state_dict(self) -> dict:
        return {"sum": self.sum, "weight": self.weight}

    def load_state_dict(self, state: dict) -> None:
        self.sum, self.weight = state["sum"].to(self.device), state["weight"]

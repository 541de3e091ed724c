"""Evaluation: a step function's metrics averaged over every sample of a dataset, across processes.

A metric is a number per batch, weighted by the batch's sample count; or a `Weighted(total, weight)`, the
batch's sum and what it is a sum over, for a mean over something else than samples:

    def validation_step(self, batch):                 # SFT: the loss per trained token, exact match per example
        nll, tokens = ...
        return {"loss": Weighted(nll, tokens), "exact_match": right_B.float().mean()}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plans import lockstep_eval_batches


@dataclass(frozen=True)
class Weighted:
    """A batch's contribution to a mean: its `total` (e.g. summed NLL) and the `weight` that total is over
    (e.g. its trained tokens). `evaluate` reports Σ total / Σ weight over every batch and process."""

    total: torch.Tensor | float
    weight: torch.Tensor | float


@torch.no_grad()
def evaluate(trainer, dataset, prefix: str, step_fn) -> dict:
    """{"<prefix>/<name>": mean} of `step_fn(batch)`'s metrics over every sample of `dataset`: in eval mode (each
    module's own mode put back after), without grad, each batch weighted by its sample count (a short last batch
    counts right) or by the weight of a `Weighted` value, summed over every process."""
    if dataset is None:
        raise ValueError(f"{prefix}: no {prefix}_data was given to the trainer")
    owner = f"{type(trainer).__name__}.{getattr(step_fn, '__name__', 'step_fn')}"
    model, device = trainer.model, trainer.device
    modes = {module: module.training for module in model.modules()}  # each put back: a frozen part stays in eval
    model.eval()
    sums: dict[str, torch.Tensor] = {}  # key -> (Σ total, Σ weight)
    try:
        # Sharded (FSDP): the same number of batches on every process, the fillers counting nothing
        batches = lockstep_eval_batches(len(dataset), trainer.config.batch_size, trainer.world_size, trainer.rank,
                                        lockstep=trainer.sharded)
        for indices, real in batches:
            with trainer.autocast():
                metrics = as_metrics(step_fn(trainer.fetch(indices, dataset)), owner)
            for key, value in metrics.items():
                if not isinstance(value, Weighted):
                    value = Weighted(float64(value, device) * len(indices), len(indices))
                pair = torch.stack([float64(value.total, device).reshape(()), float64(value.weight, device).reshape(())])
                pair = pair if real else torch.zeros_like(pair)
                sums[key] = sums[key] + pair if key in sums else pair
    finally:
        for module, training in modes.items():
            module.training = training
    keys = sorted(sums)
    totals = trainer.reduce_sum(torch.stack([sums[k] for k in keys])).tolist() if keys else []
    return {f"{prefix}/{k}": total / weight if weight else float("nan") for k, (total, weight) in zip(keys, totals)}


def float64(value, device) -> torch.Tensor:
    """A metric as a float64 tensor on `device`; a python float keeps its 53 bits (torch.as_tensor would make it
    float32 first)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(value, dtype=torch.float64, device=device)


def as_metrics(result, owner: str) -> dict:
    """An evaluation step's result as {name: scalar or Weighted}, or an error naming the method and the metric."""
    if isinstance(result, torch.Tensor):
        result = {"loss": result}
    if not isinstance(result, dict):
        raise TypeError(f"{owner} must return a dict of scalar metrics or a loss tensor; got {type(result).__name__}")
    for key, value in result.items():
        for part, number in ((("total", value.total), ("weight", value.weight)) if isinstance(value, Weighted)
                             else ((None, value),)):
            name = key if part is None else f"{key}.{part}"
            if isinstance(number, torch.Tensor):
                if number.numel() != 1:
                    raise ValueError(f"{owner} returned {name!r} of shape {tuple(number.shape)}: return one number "
                                     "per batch (its mean over the batch's samples, e.g. .mean(), or a "
                                     "Weighted(sum, weight))")
            elif not isinstance(number, (int, float)):
                raise TypeError(f"{owner} returned {name!r} as a {type(number).__name__}: metrics must be numbers or "
                                "scalar tensors")
    return result

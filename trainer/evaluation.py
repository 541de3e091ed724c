"""Evaluation: a step function's metrics averaged over every sample of a dataset, across processes."""

from __future__ import annotations

import torch

from .data import eval_batches


@torch.no_grad()
def evaluate(trainer, dataset, prefix: str, step_fn) -> dict:
    """{"<prefix>/<name>": mean over all samples} of `step_fn(batch)`'s metrics: in eval mode, without
    grad, each batch weighted by its sample count (a short last batch counts right), summed over every
    process."""
    if dataset is None:
        raise ValueError(f"{prefix}: no {prefix}_data was given to the trainer")
    owner = f"{type(trainer).__name__}.{step_fn.__name__}"
    model, device = trainer.model, trainer.device
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    try:
        for indices in eval_batches(len(dataset), trainer.config.batch_size, trainer.world_size, trainer.rank):
            with trainer.autocast():
                metrics = as_metrics(step_fn(trainer.fetch(indices, dataset)), owner)
            for key, value in metrics.items():
                value = torch.as_tensor(value, device=device).float() * len(indices)
                sums[key] = sums[key] + value if key in sums else value
            count += len(indices)
    finally:
        model.train(was_training)
    keys = sorted(sums)
    totals = trainer.reduce_sum(torch.stack([sums[k] for k in keys] + [torch.tensor(float(count), device=device)]))
    *values, n = totals.tolist()
    return {f"{prefix}/{k}": v / n for k, v in zip(keys, values)}


def as_metrics(result, owner: str) -> dict:
    """An evaluation step's result as {name: scalar}, or an error naming the method and the metric."""
    if isinstance(result, torch.Tensor):
        result = {"loss": result}
    if not isinstance(result, dict):
        raise TypeError(f"{owner} must return a dict of scalar metrics or a loss tensor; got {type(result).__name__}")
    for key, value in result.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{owner} returned {key!r} of shape {tuple(value.shape)}: return one number per "
                                 "batch (its mean over the batch's samples), e.g. .mean()")
        elif not isinstance(value, (int, float)):
            raise TypeError(f"{owner} returned {key!r} as a {type(value).__name__}: metrics must be numbers or "
                            "scalar tensors")
    return result

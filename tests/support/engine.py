"""The engine's fixtures, shared by every room: a tiny regression trainer with dropout, noise from python's and
numpy's RNGs, Adam and an LR schedule, so data order, every RNG, optimizer and scheduler state all matter to the
final weights; and the comparisons of two runs (weights, optimizer state). Imported by the tests and by the worker
scripts that the resume tests run (and kill) in subprocesses."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from paperloop import BaseTrainer, TrainerConfig
from tests.support.callbacks import StopAt


class Regression(BaseTrainer):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def validation_step(self, batch):
        x, y = batch
        pred = self.model(x)
        return {"loss": F.mse_loss(pred, y), "mae": (pred - y).abs().mean()}


class ScheduledRegression(Regression):
    def training_step(self, batch):
        x, y = batch
        # A draw from python's and one from numpy's global RNG each micro-batch (torch's: dropout), so a
        # resume that forgot either would end on other weights.
        jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        return F.mse_loss(self.model(x) * jitter, y)

    def configure_scheduler(self, optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.97 ** step)


class ThreeUpdates(ScheduledRegression):
    """A loop step that makes three optimizer updates, one per third of the step's samples: the shape of
    an RL step (one batch in, several updates), written with the public primitives only."""

    def train_step(self, step):
        x, y = self.fetch(torch.cat(step.micro_batches))
        updates = [self.update([(x_m, y_m)]) for x_m, y_m in zip(x.chunk(3), y.chunk(3))]  # each alone an update
        return {"train/loss": torch.stack([u["train/loss"] for u in updates]).mean(),
                "train/finite": all(u["train/finite"] for u in updates), "optim/lr": updates[-1]["optim/lr"]}


class WeightedRegression(Regression):
    """Samples weigh 1, 2 or 3 (by index); the loss is the weighted mean over the micro-batch; plain SGD,
    which (unlike Adam) shows any constant error in the gradient's scale."""

    def sample_weights(self):
        return sample_weight(torch.arange(len(self.train_data)))

    def training_step(self, batch):
        x, y, index = batch
        w = sample_weight(index)
        return (w * (self.model(x) - y).squeeze(1) ** 2).sum() / w.sum()

    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


def sample_weight(index: torch.Tensor) -> torch.Tensor:
    return 1.0 + (index % 3).float()


def make_data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [2.0], [-1.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_indexed_data(n: int = 48, seed: int = 0) -> TensorDataset:
    """make_data with each sample's index as a third tensor (for per-sample weights)."""
    return TensorDataset(*make_data(n, seed).tensors, torch.arange(n))


def make_model(seed: int = 0, dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(16, 1))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max().item()}"


def optimizer_tensors(trainer) -> dict[str, torch.Tensor]:
    flat = {}
    for pid, s in trainer.optimizer.state_dict()["state"].items():
        for name, v in s.items():
            flat[f"{pid}.{name}"] = torch.as_tensor(v).clone()
    return flat


def make_resume_trainer(out, grad_accum_steps: int = 1, callbacks=(), cls=ScheduledRegression,
                        **overrides) -> ScheduledRegression:
    """Dropout, shuffled data, Adam and an LR schedule: a resume must restore RNG, data order,
    optimizer and scheduler to land on the same weights. 48 samples, 6 steps an epoch, 4 epochs."""
    cfg = dict(max_epochs=4, batch_size=8 // grad_accum_steps, grad_accum_steps=grad_accum_steps, lr=0.01,
               checkpoint_every_steps=3, output_dir=str(out))
    cfg.update(overrides)
    return cls(make_model(), TrainerConfig(**cfg), train_data=make_data(48), val_data=make_data(16),
               callbacks=list(callbacks))


def straight_and_resumed(build, folder: Path, stop_at: int):
    """(a run straight through, the same run stopped resumably at step `stop_at` and resumed from its
    checkpoint); `build(out, callbacks=())` makes the trainer."""
    straight = build(folder / "straight")
    straight.fit()
    build(folder / "resumed", [StopAt(stop_at)]).fit()
    resumed = build(folder / "resumed")
    resumed.fit(resume="latest")
    return straight, resumed

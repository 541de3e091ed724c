"""Shared test fixtures: a tiny regression trainer with dropout, Adam and an LR schedule, so data order,
RNG, optimizer and scheduler state all matter to the final weights. Imported by the tests and by the
worker scripts that the resume tests run (and kill) in subprocesses."""

from __future__ import annotations

import os
import signal

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from paperloop.callbacks import Callback
from paperloop import BaseTrainer, TrainerConfig


class Regression(BaseTrainer):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def validation_step(self, batch):
        x, y = batch
        pred = self.model(x)
        return {"loss": F.mse_loss(pred, y), "mae": (pred - y).abs().mean()}


class ScheduledRegression(Regression):
    def configure_scheduler(self, optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.97 ** step)


def make_data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [2.0], [-1.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


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


class Recorder(Callback):
    """Records every hook call as (hook, epoch, global_step)."""

    def __init__(self):
        self.calls = []

    def _rec(self, name, trainer):
        self.calls.append((name, trainer.state.epoch, trainer.state.global_step))

    def on_train_begin(self, trainer): self._rec("on_train_begin", trainer)
    def on_epoch_begin(self, trainer): self._rec("on_epoch_begin", trainer)
    def on_batch_begin(self, trainer, batch): self._rec("on_batch_begin", trainer)
    def on_batch_end(self, trainer, outputs): self._rec("on_batch_end", trainer)
    def on_epoch_end(self, trainer, logs): self._rec("on_epoch_end", trainer)
    def on_train_end(self, trainer): self._rec("on_train_end", trainer)


class KillAt(Callback):
    """SIGKILLs this process (no cleanup at all, like a preempted node) at a chosen point."""

    def __init__(self, step: int, hook: str = "on_batch_begin", micro_batch: int | None = None, sig=signal.SIGKILL):
        self.step, self.hook, self.micro_batch, self.sig = step, hook, micro_batch, sig
        self.seen_in_step = 0

    def _maybe_kill(self, trainer, hook):
        if hook == self.hook and trainer.state.global_step == self.step:
            if self.micro_batch is None or self.seen_in_step == self.micro_batch:
                os.kill(os.getpid(), self.sig)

    def on_epoch_begin(self, trainer): self._maybe_kill(trainer, "on_epoch_begin")
    def on_batch_begin(self, trainer, batch): self._maybe_kill(trainer, "on_batch_begin")

    def on_batch_end(self, trainer, outputs):
        self._maybe_kill(trainer, "on_batch_end")
        self.seen_in_step = 0 if outputs["optimizer_step"] else self.seen_in_step + 1


def make_resume_trainer(out, grad_accum_steps: int = 1, callbacks=(), **overrides) -> ScheduledRegression:
    """Dropout, shuffled data, Adam and an LR schedule: a resume must restore RNG, data order,
    optimizer and scheduler to land on the same weights. 48 samples, 6 steps an epoch, 4 epochs."""
    cfg = dict(max_epochs=4, batch_size=8 // grad_accum_steps, grad_accum_steps=grad_accum_steps, lr=0.01,
               checkpoint_every_steps=3, output_dir=str(out))
    cfg.update(overrides)
    return ScheduledRegression(make_model(), TrainerConfig(**cfg), train_data=make_data(48), val_data=make_data(16),
                               callbacks=list(callbacks))

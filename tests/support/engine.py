"""Fixtures every test room shares: a tiny regression trainer with dropout, noise from python's and numpy's RNGs, Adam
and an LR schedule, so data order, every RNG, optimizer and scheduler state all matter to the final
weights. Imported by the tests and by the worker scripts that the resume tests run (and kill) in
subprocesses; `run_worker` starts those, `KillAt` and `StopAt` end a run at a chosen step."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from paperloop.callbacks import Callback
from paperloop.callbacks.guards import checkpoint_and_stop
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


class Recorder(Callback):
    """Records every hook call as (hook, epoch, global_step)."""

    def __init__(self):
        self.calls = []

    def _rec(self, name, trainer):
        self.calls.append((name, trainer.state.epoch, trainer.state.global_step))

    def on_train_begin(self, trainer): self._rec("on_train_begin", trainer)
    def on_epoch_begin(self, trainer): self._rec("on_epoch_begin", trainer)
    def on_batch_begin(self, trainer, step): self._rec("on_batch_begin", trainer)
    def on_batch_end(self, trainer, outputs): self._rec("on_batch_end", trainer)
    def on_epoch_end(self, trainer, logs): self._rec("on_epoch_end", trainer)
    def on_train_end(self, trainer): self._rec("on_train_end", trainer)


class KillAt(Callback):
    """Sends `sig` (default SIGKILL: no cleanup at all, like a preempted node) to this process in `hook`
    when `global_step == step`; with `rank`, only in the process of that rank."""

    def __init__(self, step: int, hook: str = "on_batch_begin", sig=signal.SIGKILL, rank: int | None = None):
        self.step, self.hook, self.sig, self.rank = step, hook, sig, rank

    def _maybe_kill(self, trainer, hook):
        if hook == self.hook and trainer.state.global_step == self.step and self.rank in (None, trainer.rank):
            os.kill(os.getpid(), self.sig)

    def on_epoch_begin(self, trainer): self._maybe_kill(trainer, "on_epoch_begin")
    def on_batch_begin(self, trainer, step): self._maybe_kill(trainer, "on_batch_begin")
    def on_batch_end(self, trainer, outputs): self._maybe_kill(trainer, "on_batch_end")


class StopAt(Callback):
    """Asks the run to stop after the step that makes `global_step == step`, as a preemption does: a resumable
    stop, which `fit(resume=...)` undoes. The run's last checkpoint is then whichever its own schedule wrote
    (`checkpoint_every_steps`, a ModelCheckpoint); with `checkpoint=True` one is written at this step first, by
    `checkpoint_and_stop`, what the SIGTERM guard does. `resumable=False`: a stop that ends the run for good."""

    def __init__(self, step: int, *, checkpoint: bool = False, resumable: bool = True,
                 reason: str = "test preemption"):
        if checkpoint and not resumable:
            raise ValueError("StopAt: checkpoint=True is a resumable stop (checkpoint_and_stop)")
        self.step, self.checkpoint, self.resumable, self.reason = step, checkpoint, resumable, reason

    def on_batch_end(self, trainer, outputs):
        if trainer.state.global_step != self.step:
            return
        if self.checkpoint:
            checkpoint_and_stop(trainer, self.reason)
        else:
            trainer.request_stop(self.reason, resumable=self.resumable)


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


# ---- worker scripts -----------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]  # the repository: README.md, pyproject.toml, trainer/, tests/


def run_worker(script: str | Path, *args, processes: int = 1, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python script args` (processes=1), or `torchrun --standalone --nproc-per-node N script args` (gloo on CPU,
    a free port each launch), with the output captured as text: the one way these tests start a worker script.

    Every process runs one thread (OMP_NUM_THREADS=1), as the tests do (conftest.py), so that numbers compare
    bitwise between a test and its workers; the repository root is on PYTHONPATH. With `check`, an exit status
    other than 0 fails the test with the command, the status and the tail of both outputs; pass `check=False` when
    the worker is meant to die (SIGKILL: returncode -9) and assert what you expect. Past `timeout` seconds the
    worker and every process it started (torchrun's) are killed, and the test fails the same way."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, str(script), *map(str, args)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # A session of its own, so that a timeout kills the whole group: torchrun's processes too.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            raise AssertionError(_failure(cmd, f"ran past {timeout} s and was killed", stdout, stderr)) from None
        except BaseException:  # an interrupted test run (Ctrl-C) leaves no worker behind
            _kill_group(proc)
            raise
    if check and proc.returncode != 0:
        raise AssertionError(_failure(cmd, f"exited with {proc.returncode}", stdout, stderr))
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _failure(cmd: list[str], what: str, stdout: str, stderr: str, tail: int = 3000) -> str:
    return (f"OMP_NUM_THREADS=1 PYTHONPATH={ROOT} {' '.join(cmd)}\n{what}\n"
            f"--- stdout (last {tail} characters) ---\n{stdout[-tail:]}\n"
            f"--- stderr (last {tail} characters) ---\n{stderr[-tail:]}")

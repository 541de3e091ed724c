"""BaseTrainer: the training loop, evaluation, callbacks and checkpoint/resume. Subclass it per paper."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from accelerate.utils import set_seed, send_to_device

from .callbacks import Callback, EarlyStopping, ModelCheckpoint, SignalCheckpoint

from .resume import Checkpointing
from .config import ConfigError, TrainerConfig, config_to_yaml
from .data import EpochSampler, check_dataset, eval_batches, fetch
from .distributed import make_accelerator, prepare_optimizer
from .lock import OutputLock
from .state import TrainState

log = logging.getLogger(__name__)


class BaseTrainer(Checkpointing, ABC):
    """The loop, in the order callbacks see it:

        fit(resume=None):
            setup: seed, configure_optimizer, configure_scheduler, data order
            if resume: load weights, optimizer, scheduler, TrainState, data position, RNG
            on_train_begin(trainer)                   # then a resume loads the callbacks' states
            while not (should_stop or epoch == max_epochs or global_step == max_steps):
                on_epoch_begin(trainer)
                for step in the epoch's remaining optimizer steps:   # a resume starts mid-epoch
                    for batch in the step's micro-batches (grad_accum_steps of them):
                        on_batch_begin(trainer, batch)
                        outputs = train_batch(batch)  # training_step, backward; the step's last
                                                      # micro-batch also clips, steps, schedules and
                                                      # validates when val_every_steps is due
                        on_batch_end(trainer, outputs)
                    break out if a callback asked to stop, or max_steps is reached
                if the epoch ran to its end:
                    logs = {"epoch", "train/loss", "optim/lr", "val/*" when due}
                    on_epoch_end(trainer, logs)
            on_train_end(trainer)                     # always: it runs in a finally

    A checkpoint asked for inside a hook is written once every callback has handled that hook, so
    it holds all of their updates. Write `training_step`; usually `validation_step`; optionally
    `configure_optimizer`, `configure_scheduler`, `collate`, and `extra_state`/`load_extra_state`
    for state of your own that must survive a resume.
    """

    def __init__(self, model: torch.nn.Module, config: TrainerConfig, train_data=None, val_data=None,
                 test_data=None, callbacks=()):
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, data in (("train_data", train_data), ("val_data", val_data), ("test_data", test_data)):
            if data is not None:
                check_dataset(name, data)
        if val_data is None:
            for key in ("val_every", "val_every_steps"):
                if getattr(config, key):
                    raise ConfigError(f"{key}: set to {getattr(config, key)} but no val_data was given")
            if config.early_stopping_patience and config.early_stopping_monitor.startswith("val/"):
                raise ConfigError(f"early_stopping_patience: monitors {config.early_stopping_monitor} "
                                  "but no val_data was given")
        self.config = config
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.accelerator = make_accelerator(config.precision)
        self.model = self.accelerator.prepare_model(model)
        self.callbacks: list[Callback] = list(callbacks) + default_callbacks(config, callbacks)
        self.state = TrainState()
        self.optimizer = self.scheduler = self.sampler = None
        self.error: BaseException | None = None  # set when fit() ends by an exception
        self._dispatching, self._pending_saves, self._pending_callback_states = False, [], None
        # default_collate itself (not a bound method) lets fetch() index tensor datasets directly.
        overridden = type(self).collate is not BaseTrainer.collate
        self._collate = self.collate if overridden else torch.utils.data.default_collate
        self._checkpointed_at: tuple[int, int] | None = None  # (global_step, epoch) of the last save/load

    # ---- what a subclass writes ---------------------------------------------------------------

    @abstractmethod
    def training_step(self, batch):
        """A scalar loss tensor, or a dict holding "loss" and any other metrics."""

    def validation_step(self, batch):
        """A dict of scalar metrics (or a loss tensor), averaged over all samples by validate()."""
        raise NotImplementedError(f"{type(self).__name__} has no validation_step(self, batch)")

    def test_step(self, batch):
        return self.validation_step(batch)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def configure_scheduler(self, optimizer):
        """An LR scheduler stepped once per optimizer step, or None."""
        return None

    def collate(self, samples: list):
        return torch.utils.data.default_collate(samples)

    def extra_state(self) -> dict:
        """State of a subclass that must survive a resume (tensors, numbers, strings, containers)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None) -> TrainState:
        """Train to the end; `resume` is a checkpoint directory or "latest" (the newest in
        `output_dir/checkpoints` that verifies). Returns the TrainState."""
        self._setup()
        with OutputLock(self.config.output_dir, enabled=self.is_main_process):
            if resume is not None:
                self.load_checkpoint(self._resolve_resume(resume))
            return self.train()

    def train(self) -> TrainState:
        self._setup()
        try:
            self._call("on_train_begin")
            self._load_callback_states()
            while not self._finished():
                self._call("on_epoch_begin")
                if self._run_epoch():
                    self._call("on_epoch_end", self._close_epoch())
        except BaseException as e:
            self.error = e
            raise
        finally:
            self._call("on_train_end")
        return self.state

    def _run_epoch(self) -> bool:
        """The epoch's remaining optimizer steps; False when it stopped before the epoch's end."""
        for micro_batches, step_samples in self.sampler.steps():
            for i, indices in enumerate(micro_batches):
                batch = self._fetch(self.train_data, indices)
                self._call("on_batch_begin", batch)
                outputs = self.train_batch(batch, len(indices), step_samples, last=i == len(micro_batches) - 1)
                self._call("on_batch_end", outputs)
            if self.state.should_stop or self._max_steps_reached():
                return False
        return True

    def train_batch(self, batch, n_samples: int, step_samples: int, last: bool) -> dict:
        """Forward and backward of one micro-batch of `n_samples`; the step's `last` one also steps.

        The loss is scaled by this micro-batch's share of the step's `step_samples` (times the
        process count, which DDP's gradient average divides out), so the step's gradient is the
        mean over its samples however they are split into micro-batches and processes.
        """
        scale = n_samples * self.world_size / step_samples
        with (contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)), self._autocast():
            outputs = as_outputs(self.training_step(batch), type(self).__name__)
            loss = outputs["loss"]
            self.accelerator.backward(loss if scale == 1 else loss * scale)
        loss_sum = loss.detach().float() * n_samples
        self._step_loss_sum = loss_sum if self._step_loss_sum is None else self._step_loss_sum + loss_sum
        self._step_samples += n_samples
        outputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}
        outputs["optimizer_step"] = last
        if last:
            outputs.update(self._optimizer_step(step_samples))
        return outputs

    def _optimizer_step(self, step_samples: int) -> dict:
        loss_sum, n = self._step_loss_sum, self._step_samples
        self._step_loss_sum, self._step_samples = None, 0
        step_loss = loss_sum / n  # this process's mean over the step's samples
        # The one sync per step: a NaN/inf step must never reach the weights.
        finite = self.all_processes(bool(torch.isfinite(step_loss)))
        out = {"train/loss": step_loss, "train/samples": step_samples, "train/finite": finite,
               "optim/lr": self.optimizer.param_groups[0]["lr"]}
        if finite:
            if self.config.max_grad_norm is not None:
                out["optim/grad_norm"] = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                                          self.config.max_grad_norm)
            elif (self.state.global_step + 1) % self.config.log_every_steps == 0:
                out["optim/grad_norm"] = grad_norm(self.model.parameters())
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self._epoch_loss_sum += loss_sum
            self._epoch_samples += n
        else:
            log.warning("step %d: loss is not finite; the step was skipped", self.state.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        every = self.config.val_every_steps
        if every and self.state.global_step % every == 0:
            out.update(self._validate_and_record())
        return out

    def _close_epoch(self) -> dict:
        totals = self.reduce_sum(torch.stack([self._epoch_loss_sum, torch.tensor(float(self._epoch_samples),
                                                                                  device=self.device)]))
        loss_sum, n = totals.tolist()
        self.state.train_loss_history.append(loss_sum / n if n else float("nan"))
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.sampler.start_epoch(self.state.epoch)
        self._reset_epoch_accumulators()
        logs = {"epoch": self.state.epoch, "train/loss": self.state.train_loss_history[-1],
                "optim/lr": self.optimizer.param_groups[0]["lr"]}
        every = 1 if self.config.val_every is None else self.config.val_every
        if self.val_data is not None and every and self.state.epoch % every == 0:
            logs.update(self._validate_and_record())
        return logs

    def _finished(self) -> bool:
        return self.state.should_stop or self.state.epoch >= self.config.max_epochs or self._max_steps_reached()

    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.global_step >= self.config.max_steps

    def total_steps(self) -> int:
        """Optimizer steps the whole run takes if nothing stops it early."""
        by_epochs = self.config.max_epochs * self._make_sampler().steps_per_epoch()
        return by_epochs if self.config.max_steps is None else min(by_epochs, self.config.max_steps)

    # ---- callbacks and stopping ---------------------------------------------------------------

    def _call(self, hook: str, *args) -> None:
        self._dispatching = True
        try:
            for callback in self.callbacks:
                getattr(callback, hook)(self, *args)
        finally:
            self._dispatching = False
        if self._pending_saves:
            self._write_pending_checkpoints()

    def request_stop(self, reason: str, resumable: bool = False) -> None:
        """Ask the loop to stop after the current optimizer step (or epoch). A `resumable` stop (a
        signal, a time limit) is undone by a resume; any other ends the run for good."""
        if not self.state.should_stop:
            self.state.should_stop, self.state.stop_reason, self.state.stop_resumable = True, reason, resumable
            log.info("stopping: %s", reason)

    # ---- evaluation ---------------------------------------------------------------------------

    def validate(self) -> dict:
        """`validation_step` metrics over all of val_data, as {"val/<name>": mean over samples}."""
        return self._evaluate(self.val_data, "val", self.validation_step)

    def test(self) -> dict:
        """`test_step` (by default `validation_step`) metrics over all of test_data, as {"test/<name>"}."""
        return self._evaluate(self.test_data, "test", self.test_step)

    @torch.no_grad()
    def _evaluate(self, dataset, prefix: str, step_fn) -> dict:
        if dataset is None:
            raise ValueError(f"{prefix}: no {prefix}_data was given to the trainer")
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        try:
            for indices in eval_batches(len(dataset), self.config.batch_size, self.world_size, self.rank):
                with self._autocast():
                    metrics = as_metrics(step_fn(self._fetch(dataset, indices)), type(self).__name__)
                for key, value in metrics.items():  # sample-weighted, so a short last batch counts right
                    value = torch.as_tensor(value, device=self.device).float() * len(indices)
                    sums[key] = sums[key] + value if key in sums else value
                count += len(indices)
        finally:
            self.model.train(was_training)
        keys = sorted(sums)
        totals = self.reduce_sum(torch.stack([sums[k] for k in keys] + [torch.tensor(float(count), device=self.device)]))
        *values, n = totals.tolist()
        return {f"{prefix}/{k}": v / n for k, v in zip(keys, values)}

    def _validate_and_record(self) -> dict:
        metrics = self.validate()
        self.state.val_history.append({"epoch": self.state.epoch, "step": self.state.global_step, **metrics})
        return metrics

    # ---- setup and helpers --------------------------------------------------------------------

    def _setup(self) -> None:
        """Seed, optimizer, scheduler and data order: once, before the first fit/save/load."""
        if self.optimizer is not None:
            return
        if self.train_data is None:
            raise ValueError("fit() needs train_data")
        set_seed(self.config.seed)
        optimizer = self.configure_optimizer()
        self.scheduler = self.configure_scheduler(optimizer)
        self.optimizer = prepare_optimizer(self.accelerator, optimizer)
        self.sampler = self._make_sampler()
        self._reset_epoch_accumulators()
        self._step_loss_sum, self._step_samples = None, 0

    def _make_sampler(self) -> EpochSampler:
        c = self.config
        return EpochSampler(len(self.train_data), c.batch_size, c.grad_accum_steps, self.world_size, self.rank,
                            c.seed, c.shuffle)

    def _reset_epoch_accumulators(self) -> None:
        self._epoch_loss_sum = torch.zeros((), device=self.device)
        self._epoch_samples = 0

    def _fetch(self, dataset, indices):
        batch = fetch(dataset, indices, self._collate)
        return batch if self.device.type == "cpu" else send_to_device(batch, self.device, non_blocking=True)

    def _autocast(self):
        return self.accelerator.autocast() if self.config.precision != "32" else contextlib.nullcontext()

    def config_yaml(self) -> str:
        return config_to_yaml(self.config)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, "sum") if self.world_size > 1 else tensor

    def any_process(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        return bool(self.reduce_sum(torch.tensor(float(flag), device=self.device)) > 0)

    def all_processes(self, flag: bool) -> bool:
        return not self.any_process(not flag)


def default_callbacks(config: TrainerConfig, attached) -> list[Callback]:
    """The callbacks the config asks for, where the user has not attached one of that kind."""
    has = lambda kind: any(isinstance(cb, kind) for cb in attached)  # noqa: E731
    extra: list[Callback] = []
    if config.early_stopping_patience and not has(EarlyStopping):
        extra.append(EarlyStopping(config.early_stopping_monitor, config.early_stopping_mode,
                                   config.early_stopping_patience))
    if config.checkpoint_every_steps and not has(ModelCheckpoint):
        extra.append(ModelCheckpoint(every_n_steps=config.checkpoint_every_steps))
    if not has(SignalCheckpoint):
        extra.append(SignalCheckpoint())
    return extra


def as_outputs(result, owner: str) -> dict:
    """training_step's result as a dict with a scalar "loss" tensor, or a clear error."""
    loss = result.get("loss") if isinstance(result, dict) else result
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{owner}.training_step must return a loss tensor or a dict with a 'loss' tensor; "
                        f"got {type(result).__name__}" + (f" with keys {sorted(result)}" if isinstance(result, dict) else ""))
    if loss.ndim != 0:
        raise ValueError(f"{owner}.training_step returned a loss of shape {tuple(loss.shape)}; reduce it to a scalar")
    return result if isinstance(result, dict) else {"loss": result}


def as_metrics(result, owner: str) -> dict:
    if isinstance(result, torch.Tensor):
        result = {"loss": result}
    if not isinstance(result, dict):
        raise TypeError(f"{owner}.validation_step must return a dict of scalar metrics or a loss tensor; "
                        f"got {type(result).__name__}")
    return result


def grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

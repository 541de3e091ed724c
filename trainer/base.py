"""BaseTrainer: the training loop, its step primitives, evaluation and callbacks. Subclass it per paper."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from accelerate.utils import gather_object, send_to_device, set_seed

from .callbacks import Callback, EarlyStopping, ModelCheckpoint, SignalCheckpoint
from .checkpoint import load_model_state
from .config import ConfigError, TrainerConfig, config_to_yaml
from .data import EpochSampler, Step, check_dataset, eval_batches, fetch
from .distributed import backward_fn, make_accelerator, prepare_optimizer
from .resume import Checkpointing
from .rng import rng_state, set_rng_state
from .state import TrainState

log = logging.getLogger(__name__)


class BaseTrainer(Checkpointing, ABC):
    """The loop, in the order callbacks see it:

        fit(resume=None):
            setup: seed, configure_optimizer, configure_scheduler, data plan
            if resume: load_state_dict(checkpoint)    # weights, optimizer, schedule, TrainState, plan, RNG
            on_train_begin(trainer)                   # then a resume puts back the callbacks' states
            while not (should_stop or epoch == max_epochs or global_step == max_steps):
                on_epoch_begin(trainer)
                for step in the plan's remaining steps of the epoch:  # a resume starts mid-epoch
                    on_batch_begin(trainer, step)     # step: this process's sample indices and weights
                    outputs = train_step(step)        # forward_backward() per micro-batch, optimizer_step()
                    global_step += 1; validate when val_every_steps is due
                    on_batch_end(trainer, outputs)    # checkpoints, logging, stop requests
                    break out if a callback asked to stop, or max_steps is reached
                if the epoch ran to its end:
                    on_epoch_end(trainer, {"epoch", "train/loss", "optim/lr", "val/*" when due})
            on_train_end(trainer)                     # always: it runs in a finally

    A loop step is the unit of everything outside it: one hook cycle, one `global_step`, one place
    where a checkpoint may be written and a resume may start. Inside, `train_step` makes one
    optimizer update (this class) or several (override it: RL makes one per minibatch of a rollout
    batch), each through the two public primitives `forward_backward` and `optimizer_step`. The LR
    schedule steps once per update; `state.updates` counts updates, `state.global_step` loop steps.

    Write `training_step`; usually `validation_step`; optionally `configure_optimizer`,
    `configure_scheduler`, `collate`, `sample_weights`, and `extra_state`/`load_extra_state` for
    state of your own that must survive a resume.
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
        self.accelerator = make_accelerator()
        # Read once: Accelerate's properties cost microseconds each, and the loop asks every step.
        self.device: torch.device = self.accelerator.device
        self.world_size: int = self.accelerator.num_processes
        self.rank: int = self.accelerator.process_index
        self.is_main_process: bool = self.accelerator.is_main_process
        self.model = self.accelerator.prepare_model(model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._finite_check = FiniteCheck(self._params, self.device)
        self._backward = backward_fn(self.accelerator)
        self.callbacks: list[Callback] = list(callbacks) + default_callbacks(config, callbacks)
        check_state_keys(self.callbacks)
        self.state = TrainState()
        self.optimizer = self.scheduler = self.plan = None
        self.generators: dict[str, torch.Generator] = {}  # checkpointed with the RNG state
        self.error: BaseException | None = None  # set when fit() ends by an exception
        # default_collate itself (not a bound method) lets fetch() index tensor datasets directly.
        overridden = type(self).collate is not BaseTrainer.collate
        self._collate = self.collate if overridden else torch.utils.data.default_collate
        self._pending_loss = None  # forward_backward's weighted loss sum since the last optimizer_step
        self._pending_callback_states = None
        super().__init__()

    # ---- what a subclass writes ---------------------------------------------------------------

    @abstractmethod
    def training_step(self, batch):
        """A scalar loss tensor, or a dict holding "loss" and any other metrics. With `sample_weights`,
        the loss is the weighted mean over the micro-batch (e.g. the mean over its trained tokens)."""

    def validation_step(self, batch):
        """A dict of scalar metrics (or a loss tensor), averaged over all samples by validate()."""
        raise NotImplementedError(f"{type(self).__name__} has no validation_step(self, batch)")

    def test_step(self, batch):
        return self.validation_step(batch)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def configure_scheduler(self, optimizer):
        """An LR scheduler stepped once per optimizer update, or None."""
        return None

    def collate(self, samples: list):
        return torch.utils.data.default_collate(samples)

    def sample_weights(self) -> torch.Tensor | None:
        """(N,) weight of each train sample, known before training; None (the default): each weighs 1.
        A step's gradient and `train/loss` are the weighted mean over the whole step, across micro-batches
        and processes (SFT: a sample's weight is its number of trained tokens)."""
        return None

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
        if resume is not None:
            self.load_checkpoint(self.resolve_resume(resume))
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
            self._abandon_step()
            raise
        finally:
            self._call("on_train_end")
        return self.state

    def _run_epoch(self) -> bool:
        """The epoch's remaining steps; False when it stopped before the epoch's end."""
        for step in self.plan.steps():
            self._call("on_batch_begin", step)
            outputs = self.train_step(step)
            self.plan.advance()  # only now: a step abandoned by an exception is taken again by the next fit()
            outputs = self._end_step(step, outputs)
            self._call("on_batch_end", outputs)
            if self.state.should_stop or self._max_steps_reached():
                return False
        return True

    def train_step(self, step: Step) -> dict:
        """One loop step: `forward_backward` of each micro-batch with its share of the step's weight,
        then one `optimizer_step`. Override to reshape a step (it may call `optimizer_step` several
        times); return the outputs `on_batch_end` gets, at least `train/loss` and `train/finite`."""
        shares, last = step.shares(), len(step.micro_batches) - 1
        parts = [self.forward_backward(self.fetch(indices), share, sync=i == last)
                 for i, (indices, share) in enumerate(zip(step.micro_batches, shares))]
        metrics = parts[0] if len(parts) == 1 else weighted_mean(parts, shares)
        return {**metrics, **self.optimizer_step()}

    def forward_backward(self, batch, share: float = 1.0, loss_fn=None, sync: bool = True) -> dict:
        """Forward `batch` (under autocast when precision asks), then backward its loss times `share`;
        the gradient accumulates until `optimizer_step()`.

        `share` is this batch's part of the update's total weight summed over every process, so
        the update's gradient is the weighted mean over all of its batches (1.0: this batch alone is
        the update on one process). `loss_fn(batch)` returns what `training_step` does (the default).
        `sync=False` skips DDP's gradient all-reduce: pass it for every batch of an update but the
        last. Returns the loss function's outputs, detached.
        """
        loss_fn = loss_fn or self.training_step
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
            with self._autocast():  # the forward only: PyTorch's AMP guidance keeps backward outside
                outputs = as_outputs(loss_fn(batch), type(self).__name__)
            loss = outputs["loss"]
            if not loss.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(f"{type(self).__name__}: the loss does not require grad, so nothing would be "
                                   "trained (was it computed under torch.no_grad(), detached, or from frozen "
                                   "parameters only?)")
            scale = share * self.world_size  # DDP averages gradients over processes: undo its 1/world
            self._backward(loss if scale == 1 else loss * scale)
        weighted = loss.detach().float() if share == 1 else loss.detach().float() * share
        self._pending_loss = weighted if self._pending_loss is None else self._pending_loss + weighted
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}

    def optimizer_step(self) -> dict:
        """Apply the gradient `forward_backward` accumulated: check it is finite, clip, step the
        optimizer and the LR schedule, zero the gradients, count the update in `state.updates`.

        A non-finite loss or gradient is never applied: the gradients are zeroed and the run goes on
        (`TerminateOnNonFinite` stops it). Returns `train/loss` (the update's weighted mean loss over
        every process), `train/finite`, `optim/lr`, and `optim/grad_norm` (before clipping) when
        clipping or when a log may be due (the first and every `log_every_steps`-th step).
        """
        if self._pending_loss is None:
            raise RuntimeError("optimizer_step() without a forward_backward() since the last update")
        loss = self.reduce_sum(self._pending_loss)
        self._pending_loss = None
        out = {"train/loss": loss, "optim/lr": self.optimizer.param_groups[0]["lr"]}
        if self.config.max_grad_norm is not None:
            out["optim/grad_norm"] = self.accelerator.clip_grad_norm_(self._params, self.config.max_grad_norm)
        elif (self.state.global_step + 1) % self.config.log_every_steps in (0, 1):  # a log may be due
            out["optim/grad_norm"] = grad_norm(self._params)
        # The one host sync per update: a NaN/inf loss or gradient must never reach the weights.
        out["train/finite"] = finite = self._finite_check(loss)
        if finite:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.state.updates += 1
        else:
            log.warning("step %d: the loss or gradient is not finite; the update was skipped",
                        self.state.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _end_step(self, step: Step, outputs: dict) -> dict:
        """Count the step, add it to the epoch's loss, validate when due."""
        if self._pending_loss is not None:
            raise RuntimeError(f"{type(self).__name__}.train_step ran forward_backward() after its last "
                               "optimizer_step(): that gradient would leak into the next step")
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        outputs.setdefault("train/samples", step.samples)
        if outputs.get("train/finite", True) and "train/loss" in outputs:
            self._epoch_loss_sum = torch.add(self._epoch_loss_sum, outputs["train/loss"], alpha=step.weight)
            self._epoch_weight += step.weight
        every = self.config.val_every_steps
        if every and self.state.global_step % every == 0:
            outputs.update(self._validate_and_record())
        return outputs

    def _close_epoch(self) -> dict:
        w = self._epoch_weight
        self.state.train_loss_history.append(float(self._epoch_loss_sum) / w if w else float("nan"))
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.plan.start_epoch(self.state.epoch)
        self._reset_epoch_loss()
        logs = {"epoch": self.state.epoch, "train/loss": self.state.train_loss_history[-1],
                "optim/lr": self.optimizer.param_groups[0]["lr"]}
        every = 1 if self.config.val_every is None else self.config.val_every
        if self.val_data is not None and every and self.state.epoch % every == 0:
            last = self.state.val_history[-1] if self.state.val_history else {}
            if last.get("step") == self.state.global_step:  # a step validation just ran: not twice
                logs.update({k: v for k, v in last.items() if k.startswith("val/")})
            else:
                logs.update(self._validate_and_record())
        return logs

    def _finished(self) -> bool:
        return self.state.should_stop or self.state.epoch >= self.config.max_epochs or self._max_steps_reached()

    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.global_step >= self.config.max_steps

    def total_steps(self) -> int:
        """Loop steps the whole run takes if nothing stops it early."""
        by_epochs = self.config.max_epochs * (self.plan or self.make_plan()).steps_per_epoch()
        return by_epochs if self.config.max_steps is None else min(by_epochs, self.config.max_steps)

    # ---- callbacks and stopping ---------------------------------------------------------------

    def _call(self, hook: str, *args) -> None:
        self.in_hook = True  # a checkpoint asked for now waits until every callback has seen the hook
        try:
            for callback in self.callbacks:
                getattr(callback, hook)(self, *args)
        except BaseException:
            self.end_hook(write=False)
            raise
        self.end_hook(write=True)

    def request_stop(self, reason: str, resumable: bool = False) -> None:
        """Ask the loop to stop after the current step (or epoch). A `resumable` stop (a signal, a time
        limit) is undone by a resume; any other ends the run for good."""
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
                    metrics = as_metrics(step_fn(self.fetch(indices, dataset)), f"{type(self).__name__}.{step_fn.__name__}")
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

    # ---- state: everything a resume needs, as one dict of named components ---------------------

    def register_generator(self, name: str, generator: torch.Generator) -> torch.Generator:
        """Checkpoint `generator` (e.g. the one sampling draws from) with the RNG state of each process."""
        self.generators[name] = generator
        return generator

    def state_dict(self) -> dict:
        """model, optimizer, scheduler, scaler, train_state, data (the plan's position), epoch_loss (the
        open epoch's sums), callbacks (by state_key), extra (`extra_state()`), and processes: each
        process's RNG streams (python, numpy, torch, CUDA, registered generators). Collective in DDP."""
        self._setup()
        if self._pending_loss is not None:
            raise RuntimeError("the state can only be taken between steps, not between forward_backward() and "
                               "optimizer_step()")
        rng = rng_state(self.generators)
        return {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "train_state": self.state.to_dict(),
            "data": self.plan.state_dict(),
            "epoch_loss": {"sum": self._epoch_loss_sum, "weight": self._epoch_weight},
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks if is_stateful(cb)},
            "extra": self.extra_state(),
            "processes": gather_object([rng]) if self.world_size > 1 else [rng],
        }

    def load_state_dict(self, state: dict) -> None:
        """Put back what `state_dict()` returned. Callback states wait for the next `train()`, which
        loads them right after `on_train_begin` (where callbacks reset their counters)."""
        self._setup()
        if len(state["processes"]) != self.world_size:
            raise ValueError(f"processes: written by {len(state['processes'])} process(es), this run has "
                             f"{self.world_size}")
        self.plan.load_state_dict(state["data"])  # checks seed and shape first: nothing loaded yet on error
        try:
            load_model_state(self.unwrapped_model, state["model"])
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.state = TrainState.from_dict(state["train_state"])
        if self.state.stop_resumable:  # it stopped for a signal or a time limit: carry on
            self.state.should_stop, self.state.stop_reason, self.state.stop_resumable = False, None, False
        self._epoch_loss_sum = state["epoch_loss"]["sum"].to(self.device)
        self._epoch_weight = state["epoch_loss"]["weight"]
        set_rng_state(state["processes"][self.rank], self.generators)
        self.load_extra_state(state["extra"])
        self._pending_callback_states = state["callbacks"]

    def _load_callback_states(self) -> None:
        saved, self._pending_callback_states = self._pending_callback_states, None
        if saved is None:
            return
        mine = {cb.state_key: cb for cb in self.callbacks if is_stateful(cb)}
        for key, callback in mine.items():
            if key in saved:
                callback.load_state_dict(saved[key])
            else:
                log.warning("resume: the checkpoint holds no state for callback %s; it starts fresh", key)
        for key in saved.keys() - mine.keys():
            log.warning("resume: the checkpoint holds state for callback %s, which is not attached", key)

    # ---- setup and helpers --------------------------------------------------------------------

    def _setup(self) -> None:
        """Seed, optimizer, scheduler and data plan: once, before the first fit/save/load."""
        if self.optimizer is not None:
            return
        if self.train_data is None:
            raise ValueError("fit() needs train_data")
        set_seed(self.config.seed)
        optimizer = self.configure_optimizer()
        self.scheduler = self.configure_scheduler(optimizer)
        self.optimizer = prepare_optimizer(self.accelerator, optimizer)
        self.plan = self.make_plan()
        self._reset_epoch_loss()

    def make_plan(self) -> EpochSampler:
        """The data plan: which samples each step takes. Override for another plan."""
        c = self.config
        return EpochSampler(len(self.train_data), c.batch_size, c.grad_accum_steps, self.world_size, self.rank,
                            c.seed, c.shuffle, weights=self.sample_weights())

    def _abandon_step(self) -> None:
        """An exception left a step half done: drop its gradient so a later fit() starts clean (the plan
        has not moved past the step, so that fit() takes it again)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self._pending_loss = None

    def _reset_epoch_loss(self) -> None:
        self._epoch_loss_sum = torch.zeros((), device=self.device)
        self._epoch_weight = 0.0

    def fetch(self, indices: torch.Tensor, dataset=None):
        """The batch of `dataset` (default: train_data) at `indices`, collated, on the device."""
        batch = fetch(self.train_data if dataset is None else dataset, indices, self._collate)
        return batch if self.device.type == "cpu" else send_to_device(batch, self.device, non_blocking=True)

    def _autocast(self):
        if self.config.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def config_yaml(self) -> str:
        return config_to_yaml(self.config)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

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
        extra.append(ModelCheckpoint(every_n_steps=config.checkpoint_every_steps, every_n_epochs=None))
    if not has(SignalCheckpoint):
        extra.append(SignalCheckpoint())
    return extra


def is_stateful(callback: Callback) -> bool:
    return type(callback).state_dict is not Callback.state_dict


def check_state_keys(callbacks: list[Callback]) -> None:
    """Stateful callbacks need distinct state keys, or one's checkpointed state would land in another."""
    seen: dict[str, Callback] = {}
    for cb in filter(is_stateful, callbacks):
        if cb.state_key in seen:
            raise ValueError(f"callbacks: two attached callbacks ({type(seen[cb.state_key]).__name__} and "
                             f"{type(cb).__name__}) have the state_key {cb.state_key!r}; give one its own "
                             "(callback.state_key = '...') so each finds its state on resume")
        seen[cb.state_key] = cb


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
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

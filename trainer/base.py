"""BaseTrainer: the training loop, its step primitives, evaluation and callbacks. Subclass it per paper."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from accelerate.utils import gather_object, send_to_device, set_seed

from .callbacks import Callback
from .callbacks.base import check_state_keys
from .callbacks.defaults import default_callbacks
from .config import ConfigError, TrainerConfig, config_to_yaml
from .plans import EpochPlan, Step, check_dataset, fetch
from .distributed import backward_fn, make_accelerator, no_sync, prepare_optimizer, shard_model, total_norm
from .evaluation import evaluate
from .lock import OutputLock
from .resume import Checkpointing
from .state import TrainState
from .steps import (EpochLoss, FiniteCheck, adamw, as_outputs, as_schedule, config_scheduler, grad_norm,
                    weighted_mean)

log = logging.getLogger(__name__)

_END = object()  # the end of a generator of batches


class BaseTrainer(Checkpointing, ABC):
    """The loop, in the order callbacks see it:

        fit(resume=None):
            setup: seed, configure_optimizer, configure_scheduler, data plan
            if resume: load_state_dict(checkpoint)    # weights, optimizer, schedule, TrainState, plan, RNG
            on_train_begin(trainer)                   # then a resume puts back the callbacks' states
            while not (should_stop or epoch == max_epochs or global_step == max_steps):  # either may be unset
                on_epoch_begin(trainer)
                for step in the plan's remaining steps of the epoch:  # a resume starts mid-epoch
                    on_batch_begin(trainer, step)     # step: this process's sample indices and weights
                    outputs = train_step(step)        # update(): forward_backward() per micro-batch, optimizer_step()
                    global_step += 1; validate when val_every_steps is due
                    on_batch_end(trainer, outputs)    # checkpoints, logging, stop requests
                    break out if a callback asked to stop, or max_steps is reached
                if every step of the epoch ran:
                    on_epoch_end(trainer, {"epoch", "train/loss", "optim/lr", "val/*" when due})
            on_train_end(trainer)                     # always: it runs in a finally

    A loop step is the unit of everything outside it: one hook cycle, one `global_step`, one place
    where a checkpoint may be written and a resume may start. Inside, `train_step` makes one
    optimizer update (this class) or several (override it: RL makes one per minibatch of a rollout
    batch), each through `update` (or the two primitives it is written with, `forward_backward` and
    `optimizer_step`). The LR schedule steps once per update; `state.updates` counts updates,
    `state.global_step` loop steps.

    Write `training_step`; usually `validation_step`; optionally `configure_optimizer`,
    `configure_scheduler`, `collate`, `sample_weights`, `make_plan`, `write_artifacts`,
    `write_weights`/`load_weights` for weights in a format of your own, and
    `extra_state`/`load_extra_state` for state of your own that must survive a resume.
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
        # FSDP2 shards the weights over the processes (`distributed.shard_model`); otherwise DDP through Accelerate
        self.sharded: bool = config.strategy == "fsdp" and self.world_size > 1
        self.model = shard_model(model.to(self.device)) if self.sharded else self.accelerator.prepare_model(model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._finite_check = FiniteCheck(self._params, self.device)
        self._backward = backward_fn(self.accelerator)
        self.callbacks: list[Callback] = list(callbacks) + default_callbacks(config, callbacks)
        check_state_keys(self.callbacks)
        self.state = TrainState()
        self.optimizer = self.scheduler = self.plan = None
        self.generators: dict[str, torch.Generator] = {}  # checkpointed with the RNG state
        self.error: BaseException | None = None  # set when fit() ends by an exception
        self._interrupted = False  # a stop asked with interrupt=True: train() raises KeyboardInterrupt at its end
        # default_collate itself (not a bound method) lets fetch() index tensor datasets directly.
        overridden = type(self).collate is not BaseTrainer.collate
        self._collate = self.collate if overridden else torch.utils.data.default_collate
        self._pending_loss = None  # forward_backward's weighted loss sum since the last optimizer_step
        self._last_loss = None  # the last step's train/loss, read into state.last_loss only when asked (a sync)
        self.epoch_loss = EpochLoss(self.device)
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
        return adamw(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def configure_scheduler(self, optimizer):
        """An LR scheduler stepped once per optimizer update; or {"scheduler": s, "interval": "epoch"} to
        step it when an epoch closes, with "monitor": "val/loss" for a ReduceLROnPlateau; or None. The
        default is the config's `lr_scheduler` and warmup (transformers.get_scheduler)."""
        return config_scheduler(optimizer, self.config, self.total_updates())

    def collate(self, samples: list):
        return torch.utils.data.default_collate(samples)

    def sample_weights(self) -> torch.Tensor | None:
        """(N,) weight of each train sample, known before training; None (the default): each weighs 1.
        A step's gradient and `train/loss` are the weighted mean over the whole step, across micro-batches
        and processes (SFT: a sample's weight is its number of trained tokens)."""
        return None

    def write_artifacts(self, directory: Path) -> None:
        """Write files for people and tools into a checkpoint folder before it is sealed (e.g. the
        tokenizer, so the folder loads with `from_pretrained`). Never read back on resume."""

    def extra_state(self) -> dict:
        """State of a subclass that must survive a resume (tensors, numbers, strings, containers)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self, resume: str | Path | None = None) -> TrainState:
        """Train to the end; `resume` is a checkpoint directory, "latest" (the newest in
        `output_dir/checkpoints` that verifies) or "auto" ("latest" when a checkpoint was ever committed
        there, else a fresh start: the same command starts a run or continues it). Returns the TrainState; after a
        Ctrl-C (SIGINT), raises KeyboardInterrupt once the run is checkpointed and ended (`SignalCheckpoint`)."""
        self.setup()
        with OutputLock(self.config.output_dir, enabled=self.is_main_process):  # one run writes into a folder
            if resume == "auto":
                resume = "latest" if self.has_checkpoints() else None
            if resume is not None:
                self.load_checkpoint(resume)
            self.claim_output_dir(resumed=resume is not None)  # a folder holds one run's history
            return self.train()

    def train(self) -> TrainState:
        self.setup()
        first_step, first_update = self.state.global_step, self.state.updates
        self._interrupted = False
        self._enter_train_mode()  # before on_train_begin: a callback may put modules of its choice in eval mode
        try:
            self._call("on_train_begin")
            self._load_callback_states()
            while not self._finished():
                self._call("on_epoch_begin")
                if self._run_epoch():
                    self._call("on_epoch_end", self._close_epoch())
            self._check_something_trained(first_step, first_update)
            self.wait_for_checkpoint()  # an async save: committed before on_train_end, its failure the run's error
        except BaseException as e:
            self.error = e
            self._abandon_step()
            raise
        finally:
            self.settle_last_loss()
            try:
                self._call("on_train_end")
            finally:
                self.finish_checkpoints()  # returns only once the last save (on_train_end's too) is committed
        if self._interrupted:  # the run ended cleanly: now the script that was interrupted stops too
            saved = "checkpointed; fit(resume='latest') continues it" if self.has_current_checkpoint() else \
                "with no checkpoint at that step"
            raise KeyboardInterrupt(f"{self.config.output_dir}: interrupted at step {self.state.global_step} "
                                    f"({self.state.stop_reason}), {saved}")
        return self.state

    def settle_last_loss(self) -> None:
        """Put the last step's loss into `state.last_loss` (a device sync: done at a run's end and in state_dict)."""
        if self._last_loss is not None:
            self.state.last_loss, self._last_loss = float(self._last_loss), None

    def _enter_train_mode(self) -> None:
        """Train in train mode (dropout on; transformers' gradient checkpointing recomputes only in train mode). A
        model handed over in eval mode, as `from_pretrained` returns it, is put in train mode whole; one in train
        mode keeps each submodule's own mode (a frozen BatchNorm or teacher the user put in eval mode stays so)."""
        if not self.model.training:
            log.info("the model was in eval mode (as from_pretrained returns it): it trains in train mode")
            self.model.train()

    def _check_something_trained(self, first_step: int, first_update: int) -> None:
        """A run that took steps and applied no update at all (every loss or gradient non-finite: a NaN setting, a
        broken model) has trained nothing; that is an error, not a success. A callback that stopped it (e.g.
        TerminateOnNonFinite) has said so already."""
        steps = self.state.global_step - first_step
        if steps and self.state.updates == first_update and not self.state.should_stop:
            raise RuntimeError(f"{type(self).__name__}: all {steps} steps of this fit() were skipped, as the loss or "
                               "a gradient was not finite at every one (a NaN or inf setting, input or weight?): "
                               "nothing was trained")

    def _run_epoch(self) -> bool:
        """The epoch's remaining steps; True when every step of the epoch has run (it is then closed,
        whatever stops the run after it)."""
        for step in self.plan.steps():
            self._call("on_batch_begin", step)
            outputs = self.train_step(step)
            self.plan.advance()  # only now: a step abandoned by an exception is taken again by the next fit()
            outputs = self._end_step(step, outputs)
            self._call("on_batch_end", outputs)
            if self.state.should_stop or self._max_steps_reached():
                break
        return self.plan.epoch_done()

    def train_step(self, step: Step) -> dict:
        """One loop step: one `update` from the step's micro-batches, each with its share of the step's
        weight. Override to reshape a step (it may make several updates); return the outputs
        `on_batch_end` gets, at least `train/loss` and `train/finite`."""
        return self.update((self.fetch(indices) for indices in step.micro_batches), step.shares())

    def update(self, batches, shares: list[float] | None = None, loss_fn=None) -> dict:
        """One optimizer update from `batches`: `forward_backward` of each with its share of the update
        (DDP's all-reduce runs on the last one only), then `optimizer_step`.

        `shares[k]` is batch k's part of the update's total weight over every process (see
        `forward_backward`); None: every batch of every process weighs the same (1 / the number of batches all
        processes give, counted with one all-reduce when there are several).
        `batches` may be a generator, so each is built only when its turn comes. `loss_fn(batch)` returns
        what `training_step` does (the default). Returns `optimizer_step()`'s outputs and the loss function's
        other outputs, their share-weighted mean over the batches (this process's).
        """
        if shares is None:
            batches = list(batches)
            total = len(batches) if self.world_size == 1 else int(
                self.reduce_sum(torch.tensor(len(batches), device=self.device)))
            shares = [1.0 / total] * len(batches)
        if hasattr(batches, "__len__") and len(batches) != len(shares):
            raise ValueError(f"update: {len(batches)} batches for {len(shares)} shares")
        batches, last = iter(batches), len(shares) - 1
        # zip takes a share first: a batch is only built when it has one, so one too many is noticed below
        parts = [self.forward_backward(batch, share, loss_fn, sync=k == last)
                 for k, (share, batch) in enumerate(zip(shares, batches))]
        if len(parts) != len(shares) or next(batches, _END) is not _END:
            raise ValueError(f"update: the batches given do not match the {len(shares)} shares")
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
        with contextlib.nullcontext() if sync else no_sync(self.accelerator, self.model):
            with self.autocast():  # the forward only: PyTorch's AMP guidance keeps backward outside
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
            out["optim/grad_norm"] = total_norm(self.accelerator.clip_grad_norm_(self._params,
                                                                                 self.config.max_grad_norm))
        elif (self.state.global_step + 1) % self.config.log_every_steps in (0, 1):  # a log may be due
            out["optim/grad_norm"] = total_norm(grad_norm(self._params))
        # The one host sync per update: a NaN/inf loss or gradient must never reach the weights.
        out["train/finite"] = finite = self._finite_check(loss)
        if finite:
            self.optimizer.step()
            if self._schedule.interval == "step" and self.scheduler is not None:
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
        self._last_loss = outputs.get("train/loss", self._last_loss)
        if outputs.get("train/finite", True) and "train/loss" in outputs:
            self.epoch_loss.add(outputs["train/loss"], step.weight)
        every = self.config.val_every_steps
        if every and self.state.global_step % every == 0:
            outputs.update(self._validate_and_record())
        return outputs

    def _close_epoch(self) -> dict:
        self.state.train_loss_history.append(self.epoch_loss.mean())
        self.epoch_loss.reset()
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.plan.start_epoch(self.state.epoch)
        logs = {"epoch": self.state.epoch, "train/loss": self.state.train_loss_history[-1],
                "optim/lr": self.optimizer.param_groups[0]["lr"]}
        every = 1 if self.config.val_every is None else self.config.val_every
        if self.val_data is not None and every and self.state.epoch % every == 0:
            last = self.state.val_history[-1] if self.state.val_history else {}
            if last.get("step") == self.state.global_step:  # a step validation just ran: not twice
                logs.update({k: v for k, v in last.items() if k.startswith("val/")})
            else:
                logs.update(self._validate_and_record())
        if self._schedule.interval == "epoch":
            self._step_schedule_per_epoch(logs)
        return logs

    def _step_schedule_per_epoch(self, logs: dict) -> None:
        monitor = self._schedule.monitor
        if monitor is None:
            self.scheduler.step()
        elif monitor in logs:
            self.scheduler.step(float(logs[monitor]))
        else:  # no validation this epoch, or a misspelt key: the plateau waits, and says so
            log.warning("epoch %d: the LR scheduler monitors %r, which this epoch's logs do not hold (%s)",
                        self.state.epoch, monitor, sorted(k for k in logs if k != "epoch"))

    def _finished(self) -> bool:
        epochs = self.config.epoch_limit()
        return self.state.should_stop or (epochs is not None and self.state.epoch >= epochs) \
            or self._max_steps_reached()

    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.global_step >= self.config.max_steps

    def total_steps(self) -> int:
        """Loop steps the whole run takes if nothing stops it early."""
        epochs, max_steps = self.config.epoch_limit(), self.config.max_steps
        if epochs is None:
            return max_steps
        by_epochs = (self.plan or self.make_plan()).total_steps(epochs)
        return by_epochs if max_steps is None else min(by_epochs, max_steps)

    def total_updates(self) -> int:
        """Optimizer updates the whole run makes if nothing stops it early: what a schedule spans.
        One per step here; a trainer that makes several per step says how many."""
        return self.total_steps()

    # ---- callbacks and stopping ---------------------------------------------------------------

    def _call(self, hook: str, *args) -> None:
        self.begin_hook()  # a checkpoint asked for now waits until every callback has seen the hook
        try:
            for callback in self.callbacks:
                getattr(callback, hook)(self, *args)
        except BaseException:
            self.end_hook(completed=False)
            raise
        self.end_hook(completed=True)

    def request_stop(self, reason: str, resumable: bool = False, interrupt: bool = False) -> None:
        """Ask the loop to stop after the current step (or epoch). A `resumable` stop (a signal, a time
        limit) is undone by a resume; any other ends the run for good. `interrupt`: the user interrupted the
        run (Ctrl-C): once it has ended cleanly (on_train_end run, checkpoints committed), fit() raises
        KeyboardInterrupt instead of returning as if it had finished."""
        if not self.state.should_stop:
            self.state.should_stop, self.state.stop_reason, self.state.stop_resumable = True, reason, resumable
            self._interrupted = interrupt
            log.info("stopping: %s", reason)

    # ---- evaluation ---------------------------------------------------------------------------

    def validate(self) -> dict:
        """`validation_step` metrics over all of val_data, as {"val/<name>": mean over samples}."""
        return self.evaluate(self.val_data, "val")

    def test(self) -> dict:
        """`test_step` (by default `validation_step`) metrics over all of test_data, as {"test/<name>"}."""
        return self.evaluate(self.test_data, "test", self.test_step)

    def evaluate(self, dataset, prefix: str = "val", step_fn=None) -> dict:
        """`step_fn(batch)` (default `validation_step`) metrics over every sample of `dataset`, as
        {"<prefix>/<name>": mean}: in eval mode, without grad, split across processes. A metric is a mean
        over the batch's samples, or a `Weighted(total, weight)` for a mean over something else (SFT: the
        loss over trained tokens)."""
        return evaluate(self, dataset, prefix, step_fn or self.validation_step)

    def _validate_and_record(self) -> dict:
        metrics = self.validate()
        self.state.val_history.append({"epoch": self.state.epoch, "step": self.state.global_step, **metrics})
        return metrics

    # ---- setup and helpers --------------------------------------------------------------------

    def setup(self) -> None:
        """Seed, optimizer, schedule and data plan, made once: by whichever of fit, train, state_dict and
        load_state_dict comes first (each may be a trainer's first call); later calls do nothing."""
        if self.optimizer is None:
            self.setup_again()

    def setup_again(self) -> None:
        """Make the seed, optimizer, schedule and data plan from `config` as it is now, whether or not they were
        made before: a resume does when it takes keys from the checkpoint (`resume_keeps`) into `config`."""
        if self.train_data is None:
            raise ValueError("fit() needs train_data")
        set_seed(self.config.seed)
        optimizer = self.configure_optimizer()
        self.plan = self.make_plan()  # before the schedule, which may need the run's length
        self._schedule = as_schedule(self.configure_scheduler(optimizer), type(self).__name__)
        self.scheduler = self._schedule.scheduler
        self.optimizer = prepare_optimizer(self.accelerator, optimizer)

    def make_plan(self) -> EpochPlan:
        """The data plan: which samples each step takes (and, if it says, how they are collated). Override for
        another plan."""
        c = self.config
        return EpochPlan(len(self.train_data), c.batch_size, c.grad_accum_steps, self.world_size, self.rank,
                            c.seed, c.shuffle, weights=self.sample_weights())

    @property
    def update_pending(self) -> bool:
        """Has forward_backward() accumulated a gradient that no optimizer_step() has applied yet?"""
        return self._pending_loss is not None

    def _abandon_step(self) -> None:
        """An exception left a step half done: drop its gradient so a later fit() starts clean (the plan
        has not moved past the step, so that fit() takes it again)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self._pending_loss = None

    def fetch(self, indices: torch.Tensor, dataset=None):
        """The batch of `dataset` at `indices`, collated, on the device. Without `dataset`: a training
        micro-batch of train_data, collated as the plan says (else by `collate`)."""
        collate = self._collate
        if dataset is None:
            dataset = self.train_data
            collate = (self.plan or self.make_plan()).collate or collate
        return self.to_device(fetch(dataset, indices, collate))

    def to_device(self, batch):
        """`batch` (tensors, or containers of them) on the trainer's device."""
        return batch if self.device.type == "cpu" else send_to_device(batch, self.device, non_blocking=True)

    def autocast(self):
        """bf16 autocast when `precision` asks for it, else nothing: wraps forwards, never backwards."""
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

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of `tensor` (on the device), concatenated in rank order."""
        return self.accelerator.gather(tensor) if self.world_size > 1 else tensor

    def gather_objects(self, values: list) -> list:
        """Every process's `values` (python objects, pickled: for what tensors cannot carry), in rank order."""
        return gather_object(values) if self.world_size > 1 else values

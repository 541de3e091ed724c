"""The resume half of BaseTrainer: the state a resume needs, as one dict of named components, when and where
checkpoints of it are written, and whose history the output folder holds (`claim_output_dir`: one run's).

`trainer.state_dict()` is everything a resume needs; `load_state_dict()` puts it back; `checkpoint.py`
writes and reads that dict (files, crash safety, verification) and nothing else: the weights go through
`write_weights` and `load_weights`, which a trainer may override (LMTrainer does), so the engine knows no
model format of its own. This mixin reaches the trainer only through its public attributes (model, optimizer,
scheduler, plan, state, epoch_loss, callbacks, generators, config, accelerator, error).

The loop and this half meet through named methods: the loop's hook dispatch calls `begin_hook()` and
`end_hook(completed)` around every hook (a checkpoint asked for in between is written at its end), and this half
makes the optimizer, schedule and plan through the loop's `setup()` (once) and `setup_again()` (a resume that
takes config keys from the checkpoint).

Async saves (`config.async_checkpoint`): a save asked for in a hook is taken when the hook ends (the state
and the model copied to CPU memory, on the training thread) and written by a background thread while
training goes on. At most one is in flight: the next save, and the end of `train()`, first wait for it to
be committed (`wait_for_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object

from . import checkpoint as ckpt
from .callbacks.base import is_stateful
from .config import ConfigError
from .distributed import full_state, load_full_state
from .lock import claim_folder, folder_owner
from .rng import mixed_seed, reseed, rng_state, set_rng_state
from .state import TrainState

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A checkpoint being written in the background: where, what to run once it is committed, and the
    writer's future (None on processes other than the main one, which write nothing but wait alike)."""
    path: Path
    on_commits: list = field(default_factory=list)
    writing: Future | None = None

    def failed(self) -> bool:
        """Has the writer ended with an error (without blocking)?"""
        return self.writing is not None and self.writing.done() and self.writing.exception() is not None


class Checkpointing:
    # Config keys a resume takes from the checkpoint: the restored optimizer and schedule state carry
    # them on, so a changed value here could only be recorded, never used. A resume reports each change
    # and keeps the checkpoint's value, in `config` too (TensorBoard's config text, the next
    # checkpoints' config.yaml). A subclass adds keys of its own (betas, ...).
    resume_keeps = ("lr", "weight_decay", "lr_scheduler", "warmup_steps", "warmup_ratio", "min_lr_ratio")
    # Config keys the data plan checks itself, with its own message (before anything is loaded).
    plan_checks = ("seed", "batch_size", "grad_accum_steps")
    # Does `write_weights` write the model's frozen parameters? An async save writes a copy of the model while training
    # goes on, frozen parameters included (an EMA teacher is updated in place after each step). A trainer whose
    # checkpoints leave them out (LoRA: the adapter alone) says False: its copy leaves them out too, so a base model
    # is not copied at every save, and a writer that reads one after all fails instead of writing a later step's.
    writes_frozen_weights = True

    def __init__(self):
        self._in_hook = False  # between begin_hook() and end_hook(): callbacks are handling a hook
        self._pending_saves: list[tuple[Path, object]] = []  # (path, on_commit), asked for in a hook
        self._in_flight: InFlight | None = None  # the async save being written
        self._checkpointed_at: tuple[int, int] | None = None  # (global_step, epoch) of the last save/load
        self._pending_callback_states: dict | None = None  # loaded, waiting for on_train_begin

    def write_weights(self, model: torch.nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        """Write `model`'s weights into the checkpoint folder `directory`; `state_dict`: the weights to write
        instead of the model's own (FSDP's, gathered whole from the shards). The default is `checkpoint.save_weights`
        (a model with its own `save_pretrained` writes its folder; any other, model.safetensors).

        Override for another format: every safetensors file this writes is sealed in the manifest and read back for
        `load_weights`; write nothing else that must be read (nothing is unpickled). An async save calls this in
        the writer thread with a CPU copy of the model while training goes on: use the arguments, not the trainer."""
        ckpt.save_weights(model, directory, state_dict)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the weights a checkpoint holds (the tensors of the files `write_weights` wrote, by name) into the
        model, or raise ValueError saying what does not fit. The default: `load_state_dict`, where a tied weight
        stored once is not missing. (An FSDP-sharded model loads its full state dict on every rank instead.)"""
        ckpt.load_model_state(self.unwrapped_model, tensors)

    def save_model(self, directory: str | Path) -> Path:
        """Write the model for use outside paperloop as a checkpoint holds it: the weights through `write_weights` (a
        `transformers` model: its `save_pretrained` folder; a LoRA run: its adapter) and what `write_artifacts` adds
        (a language model's tokenizer), so `from_pretrained(directory)` loads the model and its tokenizer alike.
        Every process calls it (FSDP gathers the weights whole); the main process writes."""
        directory = Path(directory)
        self.setup()
        gathered = full_state(self.model, self.optimizer)[0] if self.sharded else None
        if self.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            self.write_weights(self.unwrapped_model, directory, gathered)
            self.write_artifacts(directory)
        self.accelerator.wait_for_everyone()
        return directory

    def register_generator(self, name: str, generator: torch.Generator) -> torch.Generator:
        """Checkpoint `generator` (e.g. the one sampling draws from) with the RNG state of each process."""
        self.generators[name] = generator
        return generator

    def state_dict(self) -> dict:
        """model, optimizer, scheduler, scaler, train_state, data (the plan's position), epoch_loss (the
        open epoch's sums), callbacks (by state_key), extra (`extra_state()`), and processes: each
        process's RNG streams (python, numpy, torch, CUDA, registered generators). Collective in DDP."""
        self.setup()
        if self.update_pending:
            raise RuntimeError("the state can only be taken between steps, not between forward_backward() and "
                               "optimizer_step()")
        rng = rng_state(self.generators)
        self.settle_last_loss()
        # FSDP: gathered whole to the main process (a collective), in the format every other run writes
        model, optimizer = (full_state(self.model, self.optimizer) if self.sharded
                            else (self.unwrapped_model.state_dict(), self.optimizer.state_dict()))
        return {
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "train_state": self.state.to_dict(),
            "config": dataclasses.asdict(self.config),
            "data": self.plan.state_dict(),
            "epoch_loss": self.epoch_loss.state_dict(),
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks if is_stateful(cb)},
            "extra": self.extra_state(),
            "fingerprints": self.fingerprints(),
            "processes": gather_object([rng]) if self.world_size > 1 else [rng],
        }

    def load_state_dict(self, state: dict) -> None:
        """Put back what `state_dict()` returned. Callback states wait for the next `train()`, which
        loads them right after `on_train_begin` (where callbacks reset their counters)."""
        self._check_same_run(state)  # before anything is loaded: an error leaves the trainer as it was
        train_state = TrainState.from_dict(state["train_state"])  # checked: counters in range, of the right types
        if state["data"].get("epoch") != train_state.epoch:
            raise ValueError(f"data plan: the checkpoint's data position is in epoch {state['data'].get('epoch')!r}, "
                             f"its train_state in epoch {train_state.epoch}: a checkpoint written holds one epoch")
        if self._keep_checkpoint_config(state["config"]):
            self.setup_again()  # the optimizer and schedule from the checkpoint's values; their state comes next
        self.setup()
        # Another process count: the plan checks that a step's global samples are the same (batch_size x
        # grad_accum_steps x processes) and refuses otherwise; what cannot follow is each process's random streams.
        written_by = len(state["processes"])
        self.plan.load_state_dict(state["data"])  # checks seed and shape first: nothing loaded yet on error
        try:
            if self.sharded:
                load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
            else:
                self.load_weights(state["model"])
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        if not self.sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.state, self._last_loss = train_state, None
        if self.state.stop_resumable:  # it stopped for a signal or a time limit: carry on
            self.state.should_stop, self.state.stop_reason, self.state.stop_resumable = False, None, False
        self.epoch_loss.load_state_dict(state["epoch_loss"])
        if written_by != self.world_size:
            log.warning("resume: the checkpoint was written by %d process(es), this run has %d: the data order and "
                        "each step's samples are the checkpoint's, but per-process random streams (dropout, each "
                        "process's sampling generator) cannot be continued; processes beyond the checkpoint's are "
                        "seeded from (seed, rank, step)", written_by, self.world_size)
        if self.rank < written_by:
            set_rng_state(state["processes"][self.rank], self.generators)
        else:
            reseed(mixed_seed(self.config.seed, self.rank, self.state.global_step), self.generators)
        self.load_extra_state(state["extra"])
        self._pending_callback_states = state["callbacks"]

    def fingerprints(self) -> dict[str, str]:
        """{name: digest} of what a run is made of beyond its config (a language-model trainer: its tokenizer, its
        tokenized training data, its reward functions), stored in every checkpoint; a resume whose digests differ
        is refused, naming the one. Computed once."""
        if getattr(self, "_fingerprints", None) is None:
            self._fingerprints = self.compute_fingerprints()
        return self._fingerprints

    def compute_fingerprints(self) -> dict[str, str]:
        """Override to add what defines your run (the default: nothing beyond the config and the data plan)."""
        return {}

    def _check_same_run(self, state: dict) -> None:
        """Refuse a checkpoint of another run: a config key that shapes the update with another value, or another
        fingerprint. Keys the config lists in `resume_may_change` (the run's length, logging, checkpointing,
        validation) may change; `resume_keeps` keys are taken from the checkpoint (see there)."""
        saved, mine = state["config"], dataclasses.asdict(self.config)
        free = set(self.config.resume_may_change) | set(self.resume_keeps) | set(self.plan_checks)
        for key, value in mine.items():
            if key in saved and key not in free and saved[key] != value:
                raise ValueError(f"config: {key} is {saved[key]!r} in the checkpoint but {value!r} in this run, and "
                                 f"it changes what the run computes: resume with {key}={saved[key]!r}, or start a new "
                                 f"run (keys that may change on resume: {', '.join(self.config.resume_may_change)})")
        # The run goes on with the checkpoint's schedule (resume_keeps): one that spans the run's length is
        # reshaped by another length, and the learning rate would jump.
        schedule = {k: saved.get(k, mine.get(k)) if k in self.resume_keeps else mine.get(k)
                    for k in ("lr_scheduler", "warmup_ratio")}
        if schedule["lr_scheduler"] not in (None, "constant") or schedule["warmup_ratio"]:
            for key in ("max_steps", "max_epochs"):
                if key in saved and key in mine and saved[key] != mine[key]:
                    raise ValueError(f"config: {key} is {saved[key]!r} in the checkpoint but {mine[key]!r} in this run, "
                                     f"and the checkpoint's {schedule['lr_scheduler']!r} schedule (warmup_ratio "
                                     f"{schedule['warmup_ratio']}) spans the run's length: the learning rate would "
                                     f"jump. Resume with {key}={saved[key]!r}, or use a constant schedule to extend "
                                     f"runs")
        for name, digest in self.fingerprints().items():
            recorded = state.get("fingerprints", {}).get(name)  # a checkpoint written before fingerprints: none
            if recorded is not None and recorded != digest:
                raise ValueError(self.fingerprint_mismatch(name))

    def fingerprint_mismatch(self, name: str) -> str:
        """What a resume is told when this run's `name` fingerprint differs from the checkpoint's; override to say
        more (where that part of the run comes from)."""
        return (f"{name}: is not the one the checkpointed run used (its fingerprint differs); resume with the same "
                f"{name}, or start a new run")

    def _keep_checkpoint_config(self, saved: dict) -> bool:
        """Take the `resume_keeps` keys whose values differ from the checkpoint's config into `config`, warning
        about each; True when there were any."""
        changed = {k: saved[k] for k in self.resume_keeps if k in saved and saved[k] != getattr(self.config, k)}
        if not changed:
            return False
        for key, value in changed.items():
            log.warning("resume: %s is %r in this run's config but %r in the checkpoint; the run goes on with "
                        "the checkpoint's %r, which its optimizer and schedule state hold (to change it, start "
                        "a new run from the checkpoint's weights)", key, getattr(self.config, key), value, value)
        self.config = dataclasses.replace(self.config, **changed)
        return True

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

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    def save_checkpoint(self, path: str | Path | None = None, on_commit=None) -> Path:
        """Write a checkpoint to `path` (default `checkpoint_dir/step-<global_step>`) and return it.

        Called from a hook, the write waits until every callback has handled that hook, so the
        checkpoint holds their updated state; `on_commit(path)` runs once it is committed. With
        `config.async_checkpoint`, such a save is copied to CPU memory when the hook ends and written in
        the background: `on_commit` then runs on the training thread when the trainer next waits for it
        (the next save, or the end of `train()`, which returns only once it is committed), never in the
        writer thread, as callbacks are not thread-safe. Called outside a hook, the checkpoint is
        committed when this returns.
        """
        path = Path(path) if path is not None else self._next_checkpoint_path()
        if self._in_hook:
            self._pending_saves.append((path, on_commit))
            return path
        self._write_checkpoint(path, [on_commit] if on_commit is not None else [], background=False)
        return path

    def begin_hook(self) -> None:
        """The loop's dispatch tells this half that callbacks are handling a hook: until `end_hook`, a checkpoint
        asked for (`save_checkpoint`) waits, so it holds the updates of every callback, whatever their order."""
        self._in_hook = True

    def end_hook(self, completed: bool) -> None:
        """The loop's dispatch tells this half that the hook is over: write the checkpoints asked for inside it,
        once each, in order (or drop them, when a callback raised, `completed` False: the state they would hold
        is not one the run reached). One process alone: first, a background write that failed stops the run
        here, at the first hook end after it (unless the run is ending by an exception already:
        `finish_checkpoints` logs it then)."""
        self._in_hook = False
        pending, self._pending_saves = self._pending_saves, []
        if not completed:
            return
        if self.world_size == 1 and self.error is None and self._in_flight is not None and self._in_flight.failed():
            self.wait_for_checkpoint()  # raises its error
        on_commits: dict[Path, list] = {}
        for path, on_commit in pending:
            on_commits.setdefault(path, []).extend([on_commit] if on_commit is not None else [])
        for path, commits in on_commits.items():
            self._write_checkpoint(path, commits, background=self.config.async_checkpoint)

    def _next_checkpoint_path(self) -> Path:
        base = self.checkpoint_dir / f"step-{self.state.global_step:06d}"
        for path, _ in self._pending_saves:  # asked for twice in one hook: the same state, one write
            if path.parent == base.parent and (path.name == base.name or path.name.startswith(base.name + ".")):
                return path
        writing = self._in_flight.path if self._in_flight is not None else None  # not in its place yet
        path, i = base, 0
        while path.exists() or path == writing:
            i += 1
            path = base.with_name(f"{base.name}.{i}")
        return path

    def _write_checkpoint(self, path: Path, on_commits: list, background: bool) -> None:
        """Take the state on every process (it gathers their RNG states: a collective, so it stays on the
        training thread) and have the main process write it: here, or (`background`) in a thread."""
        self.wait_for_checkpoint()  # at most one in flight: the previous one is committed first
        state = self.state_dict()
        snapshot = None
        if self.is_main_process:
            write_weights = self._weights_writer(state.pop("model"), copy=background)
            snapshot = ckpt.take(path, state, write_weights, self.config_yaml(),
                                 {"global_step": self.state.global_step, "epoch": self.state.epoch},
                                 run_id=self.state.run_id, artifacts=self.write_artifacts, copy=background)
        if background:
            writing = ckpt.finish_in_background(snapshot) if snapshot is not None else None
            self._in_flight = InFlight(path, on_commits, writing)
            self._checkpointed_at = (self.state.global_step, self.state.epoch)
            return
        if snapshot is not None:
            ckpt.finish(snapshot)
            log.info("checkpoint written: %s", path)
        self.accelerator.wait_for_everyone()
        self._checkpointed_at = (self.state.global_step, self.state.epoch)
        for on_commit in on_commits:
            on_commit(path)

    def _weights_writer(self, gathered: dict, copy: bool) -> Callable[[Path], None]:
        """`write_weights` bound to what this save writes, so it writes the same files on this thread or the
        writer's: the weights gathered whole from the shards (FSDP: copies already), else the model itself, or a
        copy of it in CPU memory when the write runs while training changes the original (`copy`; without the frozen
        parameters when `writes_frozen_weights` is False)."""
        model = self.unwrapped_model
        if self.sharded:
            return functools.partial(self.write_weights, model, state_dict=gathered)
        if not copy:
            return functools.partial(self.write_weights, model)
        if self.writes_frozen_weights:
            return functools.partial(self.write_weights, ckpt.cpu_copy(model))
        return functools.partial(self._write_without_frozen, ckpt.cpu_copy(model, omit_frozen=True))

    def _write_without_frozen(self, copy: torch.nn.Module, directory: Path) -> None:
        """`write_weights` of a copy that left the frozen parameters out (`writes_frozen_weights` False): a writer that
        reads one is told so, rather than failing on a meta tensor with no word of why."""
        try:
            self.write_weights(copy, directory)
        except NotImplementedError as e:  # torch's "Cannot copy out of meta tensor"
            if "meta" not in str(e):
                raise
            raise RuntimeError(f"{type(self).__name__}.write_weights read a frozen parameter, which the copy an async "
                               f"save writes leaves out as {type(self).__name__}.writes_frozen_weights is False; set "
                               f"it to True if the checkpoint holds frozen parameters ({e})") from e

    def wait_for_checkpoint(self) -> None:
        """Wait until the checkpoint being written in the background, if any, is committed; then run its
        `on_commit` callbacks here, on the training thread. A failed write raises a CheckpointError naming
        it, chained to the writer's error.

        Every process calls this at the same points (the next save, the end of `train()`), and the
        processes pass it together: the main one only once its writer is done, so no process takes the
        checkpoint for committed (and looks for it with `resume="latest"`) before it is, and all of them
        learn whether the write failed, so they stop together instead of waiting on each other."""
        saving = self._in_flight
        if saving is None:
            return
        error = saving.writing.exception() if saving.writing is not None else None  # blocks until it is done
        self._in_flight = None
        failed = error is not None
        if self.world_size > 1:  # a collective: the main process joins it once its writer is done
            failed = self.any_process(failed)
        if error is not None:
            raise ckpt.CheckpointError(f"{saving.path}: writing the checkpoint in the background failed "
                                       f"({type(error).__name__}: {error}); it was not committed") from error
        if failed:
            raise ckpt.CheckpointError(f"{saving.path}: the main process failed to write the checkpoint")
        log.info("checkpoint written: %s", saving.path)
        for on_commit in saving.on_commits:
            on_commit(saving.path)

    def finish_checkpoints(self) -> None:
        """The end of `train()`: wait for the checkpoint in flight. When the run ends by an exception
        already (`self.error`), a failed write is logged, and that exception is the one raised."""
        if self.error is None:
            return self.wait_for_checkpoint()
        try:
            self.wait_for_checkpoint()
        except ckpt.CheckpointError:
            log.exception("while the run was ending with %s", type(self.error).__name__)

    def load_checkpoint(self, path: str | Path) -> None:
        """Verify the checkpoint at `path` and restore everything it holds (`load_state_dict`). "latest" is
        the newest committed checkpoint in `checkpoint_dir` that verifies and parses."""
        limit = self.checkpoint_size_limit()
        path, state = self._read_latest() if str(path) == "latest" else (Path(path), ckpt.read(Path(path), limit=limit))
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            where = path / (ckpt.WEIGHTS if str(e).startswith("model:") else ckpt.STATE_JSON)
            raise ckpt.CheckpointError(f"{where}: {e if not isinstance(e, KeyError) else f'no entry {e}'}") from None
        self._checkpointed_at = (self.state.global_step, self.state.epoch)
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.global_step)

    def _read_latest(self) -> tuple[Path, dict]:
        path, state, skipped = ckpt.read_latest(self.checkpoint_dir, self.checkpoint_size_limit())
        for bad, reason in skipped:
            log.warning("resume: skipped %s: %s", bad, reason)
        if path is None:
            raise ckpt.CheckpointError(f"{self.checkpoint_dir}: no committed checkpoint verifies, nothing to resume")
        return path, state

    def checkpoint_size_limit(self) -> int:
        """The most bytes of tensors (weights and state) a checkpoint of this run can hold: one whose manifest seals
        more is refused before anything is hashed (a crafted manifest naming a sparse file of 200 GB would otherwise
        stall `resume="latest"` for many minutes before it tried an older checkpoint). Eight times the model's tensors
        (its weights, an optimizer's moments, a copy of the weights of its own) and 1 GiB for the rest of the state;
        override for a trainer whose `extra_state` holds more."""
        model_bytes = sum(t.numel() * t.element_size() for t in self.unwrapped_model.state_dict().values())
        return 8 * model_bytes + (1 << 30)

    def claim_output_dir(self, resumed: bool) -> None:
        """A folder holds one run's history: its checkpoints and logs (what each callback's `logged_history` finds).
        A new run into an output_dir holding another run's history is refused (its logs would be trimmed, its
        TensorBoard mixed with this one's, its checkpoints named beside this run's), and so is a resume into a folder
        another run owns; otherwise this run claims the folder (`run.json`). Every process raises alike."""
        why = self._output_dir_refusal(resumed) if self.is_main_process else None
        if self.any_process(why is not None):
            raise ConfigError(why or f"output_dir: {self.config.output_dir} holds another run's history (the main "
                              "process says which)")
        if self.is_main_process:
            claim_folder(self.config.output_dir, self.state.run_id)

    def _output_dir_refusal(self, resumed: bool) -> str | None:
        folder, mine = Path(self.config.output_dir), self.state.run_id
        owner = folder_owner(folder)
        if owner == mine:
            return None  # this run's own folder: a resume, or this trainer's next fit()
        found = [f"{self.checkpoint_dir} holds checkpoints"] if ckpt.index_events(self.checkpoint_dir, warn=False) \
            else []
        found += [what for cb in self.callbacks if (what := cb.logged_history(self)) is not None]
        if not found or (owner is None and (resumed or self.state.global_step)):
            return None  # nothing written yet; or a folder from before run.json, which a resume of its run adopts
        history = "; ".join(found)
        if resumed:
            return (f"output_dir: {folder} holds the history of run {owner} ({history}), and the checkpoint resumed "
                    f"is run {mine}'s: their logs and checkpoints would mix. Resume it in its own output_dir, or a "
                    "new one")
        resume = ("resume it (fit(resume='latest'), or resume='auto' to start or continue), "
                  if self.has_checkpoints() else "it wrote no checkpoint to resume from: ")
        return (f"output_dir: {folder} holds another run's history ({history}), which a new run would mix with and "
                f"trim; {resume}choose another output_dir, or delete those files to start over")

    def has_checkpoints(self) -> bool:
        """Was a checkpoint ever committed in `checkpoint_dir` (what `fit(resume="auto")` asks)?"""
        return bool(ckpt.committed(self.checkpoint_dir))

    def has_current_checkpoint(self) -> bool:
        """Was a checkpoint written (or loaded) at this very step and epoch? An async one counts once it is
        taken: `train()` returns only once it is committed, or raises."""
        return self._checkpointed_at == (self.state.global_step, self.state.epoch)

    def remove_checkpoint(self, name: str) -> None:
        if self.is_main_process:
            ckpt.record_removal(self.checkpoint_dir, name, run_id=self.state.run_id)

"""The checkpoint half of BaseTrainer: what a checkpoint holds, when it is written, how a run resumes.

File formats and crash safety live in `checkpoint.py`; this mixin decides what state goes in and
puts it back. It uses the trainer's model, optimizer, scheduler, sampler, state and callbacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate.utils import gather_object

from .callbacks import Callback

from . import checkpoint as ckpt
from .rng import rng_state, set_rng_state
from .state import TrainState

log = logging.getLogger(__name__)


class Checkpointing:
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    def save_checkpoint(self, path: str | Path | None = None, on_commit=None) -> Path:
        """Write a checkpoint to `path` (default `checkpoint_dir/step-<global_step>`) and return it.

        Called from a hook, the write waits until every callback has handled that hook, so the
        checkpoint holds their updated state; `on_commit(path)` runs once it is committed.
        """
        self._setup()
        path = Path(path) if path is not None else self._next_checkpoint_path()
        if self._dispatching:
            self._pending_saves.append((path, on_commit))
            return path
        self._write_checkpoint(path)
        if on_commit is not None:
            on_commit(path)
        return path

    def _write_pending_checkpoints(self) -> None:
        pending, self._pending_saves = self._pending_saves, []
        for path in dict.fromkeys(p for p, _ in pending):  # one write per path, in order
            self._write_checkpoint(path)
        for path, on_commit in pending:
            if on_commit is not None:
                on_commit(path)

    def _next_checkpoint_path(self) -> Path:
        base = self.checkpoint_dir / f"step-{self.state.global_step:06d}"
        for path, _ in self._pending_saves:  # asked for twice in one hook: the same state, one write
            if path.parent == base.parent and (path.name == base.name or path.name.startswith(base.name + ".")):
                return path
        path, i = base, 0
        while path.exists():
            i += 1
            path = base.with_name(f"{base.name}.{i}")
        return path

    def _write_checkpoint(self, path: Path) -> None:
        state = self._checkpoint_state()  # every process: it gathers their RNG states
        if self.is_main_process:
            if path.exists():
                raise FileExistsError(f"{path}: a checkpoint there exists already")
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt.remove_leftovers(path.parent, self.state.run_id)
            tmp = ckpt.temporary_dir(path)
            ckpt.save_weights(self.unwrapped_model, tmp)
            ckpt.save_state(tmp, state)
            (tmp / "config.yaml").write_text(self.config_yaml())
            ckpt.commit(tmp, path, {"global_step": self.state.global_step, "epoch": self.state.epoch},
                        run_id=self.state.run_id)
            log.info("checkpoint written: %s", path)
        self.accelerator.wait_for_everyone()
        self._checkpointed_at = (self.state.global_step, self.state.epoch)

    def _checkpoint_state(self) -> dict:
        if self._step_samples:
            raise RuntimeError("a checkpoint can only be written between optimizer steps, not in the middle of "
                               "gradient accumulation (check outputs['optimizer_step'] in on_batch_end)")
        per_process = {"rng": rng_state(), "epoch_loss_sum": self._epoch_loss_sum, "epoch_samples": self._epoch_samples}
        return {
            "train_state": self.state.to_dict(),
            "data": self.sampler.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "callbacks": {key: state for key, cb in self._callback_keys().items() if (state := cb.state_dict())},
            "extra": self.extra_state(),
            "processes": gather_object([per_process]) if self.world_size > 1 else [per_process],
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything a checkpoint holds. Callback states are loaded when training starts,
        right after on_train_begin (which resets their counters)."""
        self._setup()
        path = Path(path)
        ckpt.verify(path)
        ckpt.load_weights(self.unwrapped_model, path)
        state = ckpt.load_state(path)
        processes = state["processes"]
        if len(processes) != self.world_size:
            raise ckpt.CheckpointError(f"{path / ckpt.STATE_JSON}: written by {len(processes)} process(es), "
                                       f"this run has {self.world_size}")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None and state["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.state = TrainState.from_dict(state["train_state"])
        if self.state.stop_resumable:  # it stopped for a signal or a time limit: carry on
            self.state.should_stop, self.state.stop_reason, self.state.stop_resumable = False, None, False
        self.sampler.load_state_dict(state["data"])
        mine = processes[self.rank]
        set_rng_state(mine["rng"])
        self._epoch_loss_sum = mine["epoch_loss_sum"].to(self.device)
        self._epoch_samples = mine["epoch_samples"]
        self.load_extra_state(state["extra"])
        self._pending_callback_states = state["callbacks"]
        self._checkpointed_at = (self.state.global_step, self.state.epoch)
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.global_step)

    def _load_callback_states(self) -> None:
        saved, self._pending_callback_states = self._pending_callback_states, None
        if saved is None:
            return
        mine = self._callback_keys()
        for key, callback in mine.items():
            if key in saved:
                callback.load_state_dict(saved[key])
            elif callback.state_dict():  # a stateless callback has nothing to miss
                log.warning("resume: the checkpoint holds no state for callback %s; it starts fresh", key)
        for key in saved.keys() - mine.keys():
            log.warning("resume: the checkpoint holds state for callback %s, which is not attached", key)

    def _callback_keys(self) -> dict[str, Callback]:
        """Callbacks keyed by class name (and its occurrence, when a class is attached twice)."""
        keys: dict[str, Callback] = {}
        for callback in self.callbacks:
            name = type(callback).__name__
            key, i = name, 1
            while key in keys:
                key, i = f"{name}.{i}", i + 1
            keys[key] = callback
        return keys

    def _resolve_resume(self, resume: str | Path) -> Path:
        if str(resume) != "latest":
            return Path(resume)
        path, skipped = ckpt.find_latest(self.checkpoint_dir)
        for bad, reason in skipped:
            log.warning("resume: skipped %s: %s", bad, reason)
        if path is None:
            raise ckpt.CheckpointError(f"{self.checkpoint_dir}: no committed checkpoint verifies, nothing to resume")
        return path

    def has_current_checkpoint(self) -> bool:
        """Was a checkpoint written (or loaded) at this very step and epoch?"""
        return self._checkpointed_at == (self.state.global_step, self.state.epoch)

    def remove_checkpoint(self, name: str) -> None:
        if self.is_main_process:
            ckpt.record_removal(self.checkpoint_dir, name, run_id=self.state.run_id)

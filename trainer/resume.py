"""The checkpoint half of BaseTrainer: when a checkpoint is written, where, and how a run resumes.

What a checkpoint holds is `trainer.state_dict()`; `checkpoint.py` writes and reads that dict (files,
crash safety, verification) and nothing else. This mixin only decides when and where, through the
trainer's public API (`state_dict`, `load_state_dict`, `config`, `state`, `accelerator`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import checkpoint as ckpt

log = logging.getLogger(__name__)


class Checkpointing:
    def __init__(self):
        self.in_hook = False  # set by the trainer while callbacks handle a hook
        self._pending_saves: list[tuple[Path, object]] = []
        self._checkpointed_at: tuple[int, int] | None = None  # (global_step, epoch) of the last save/load

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints"

    def save_checkpoint(self, path: str | Path | None = None, on_commit=None) -> Path:
        """Write a checkpoint to `path` (default `checkpoint_dir/step-<global_step>`) and return it.

        Called from a hook, the write waits until every callback has handled that hook, so the
        checkpoint holds their updated state; `on_commit(path)` runs once it is committed.
        """
        path = Path(path) if path is not None else self._next_checkpoint_path()
        if self.in_hook:
            self._pending_saves.append((path, on_commit))
            return path
        self._write_checkpoint(path)
        if on_commit is not None:
            on_commit(path)
        return path

    def end_hook(self, write: bool) -> None:
        """The hook is over: write the checkpoints asked for inside it, once each, in order (or drop
        them, when a callback raised: the state they would hold is not one the run reached)."""
        self.in_hook = False
        pending, self._pending_saves = self._pending_saves, []
        if not write or not pending:
            return
        for path in dict.fromkeys(p for p, _ in pending):
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
        state = self.state_dict()  # every process: it gathers their RNG states
        if self.is_main_process:
            ckpt.write(path, state, self.unwrapped_model, self.config_yaml(),
                       {"global_step": self.state.global_step, "epoch": self.state.epoch, "run": self.state.run_id})
            log.info("checkpoint written: %s", path)
        self.accelerator.wait_for_everyone()
        self._checkpointed_at = (self.state.global_step, self.state.epoch)

    def load_checkpoint(self, path: str | Path) -> None:
        """Verify the checkpoint at `path` and restore everything it holds (`load_state_dict`)."""
        path = Path(path)
        state = ckpt.read(path)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as e:
            where = path / (ckpt.WEIGHTS if str(e).startswith("model:") else ckpt.STATE_JSON)
            raise ckpt.CheckpointError(f"{where}: {e if not isinstance(e, KeyError) else f'no entry {e}'}") from None
        self._checkpointed_at = (self.state.global_step, self.state.epoch)
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.global_step)

    def resolve_resume(self, resume: str | Path) -> Path:
        """`resume` as a checkpoint path: "latest" is the newest in `checkpoint_dir` that verifies."""
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
            ckpt.record_removal(self.checkpoint_dir, name)

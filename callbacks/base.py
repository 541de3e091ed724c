"""Callback: six hooks, all no-ops, each taking the trainer first; and LambdaCallback for one-offs.

A callback reads `trainer.state`, `trainer.model` and `trainer.config`, asks the trainer to stop with
`trainer.request_stop(reason)` (never by raising), and exposes the counters it keeps through
`state_dict()` / `load_state_dict()` so they survive a resume. Settings are constructor arguments;
runtime counters are reset in `on_train_begin` (a resumed run loads them right after it).

`on_batch_begin` / `on_batch_end` fire once per loop step (all of its micro-batches, and every optimizer
update it makes). A checkpoint stores each stateful callback's state under its `state_key`: the class
name unless the class or the instance sets another, so attaching a callback in front of the others
does not misplace their states.
"""

from __future__ import annotations

HOOKS = ("on_train_begin", "on_epoch_begin", "on_batch_begin", "on_batch_end", "on_epoch_end", "on_train_end")


class Callback:
    state_key = "Callback"  # each subclass gets its own name (__init_subclass__); set one per instance at will

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "state_key" not in cls.__dict__:
            cls.state_key = cls.__name__

    def on_train_begin(self, trainer) -> None: ...

    def on_epoch_begin(self, trainer) -> None: ...

    def on_batch_begin(self, trainer, step) -> None:
        """`step`: the loop step's `Step` (this process's sample indices per micro-batch, and weights)."""

    def on_batch_end(self, trainer, outputs: dict) -> None:
        """`outputs`: the step's `train/loss`, `train/finite`, `optim/lr`, `optim/grad_norm`, `train/samples`,
        `training_step`'s other values, and `val/*` when a step validation ran."""

    def on_epoch_end(self, trainer, logs: dict) -> None: ...

    def on_train_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def logged_history(self, trainer) -> str | None:
        """Not a hook: asked once as a fit starts, on the main process. What a run has written where this callback
        writes (a logger's files), in a few words naming the place, or None. A folder holds one run's history: a new
        run that would write beside another's is refused (`Checkpointing.claim_output_dir`)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class LambdaCallback(Callback):
    """LambdaCallback(on_epoch_end=lambda trainer, logs: print(logs["train/loss"]))"""

    def __init__(self, **hooks):
        unknown = set(hooks) - set(HOOKS)
        if unknown:
            raise TypeError(f"LambdaCallback: unknown hook(s) {sorted(unknown)}; hooks are {', '.join(HOOKS)}")
        for name, fn in hooks.items():
            setattr(self, name, fn)


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

"""Run by test_async_checkpoint.py in a subprocess (and under torchrun with --ddp): the resume fixture with async
checkpoint saves, a background write that hangs half-written or is slowed down, and a signal at a chosen step:

    python -m tests.engine.async_checkpoint_worker --out DIR [--hang-in-save N] [--step S --signal SIGKILL]

Prints (or, with --ddp, writes per rank) the final state and the checkpoints committed when fit() returned."""

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import paperloop.checkpoint as ckpt
from paperloop import TrainerConfig
from paperloop.callbacks import LambdaCallback, ModelCheckpoint
from tests.support.callbacks import KillAt, StopAt
from tests.support.engine import ScheduledRegression, make_data, make_model, make_resume_trainer

ASYNC = dict(async_checkpoint=True)


def before(hook, write):
    """`write` (save_weights(model, directory) or save_state(directory, state)) with `hook(directory)` run
    first, in whichever thread writes."""
    def wrapped(*args):
        hook(next(a for a in args if isinstance(a, Path)))
        return write(*args)
    return wrapped


def in_writer_thread() -> bool:
    return threading.current_thread() is not threading.main_thread()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--hang-in-save", type=int, help="the Nth background write stops half-written, forever")
    p.add_argument("--slow-writes", type=float, default=0.0, help="seconds each background write sleeps first")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--step", type=int, help="send --signal at on_batch_begin of this global_step")
    p.add_argument("--signal", default="SIGKILL")
    p.add_argument("--ddp", action="store_true", help="under torchrun: the DDP fixture of tests/engine/ddp_worker.py")
    p.add_argument("--stop-at", type=int)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    writes, hanging = [], threading.Event()

    def hang_or_sleep(directory):
        if not in_writer_thread():
            return
        writes.append(directory)
        time.sleep(args.slow_writes)
        if len(writes) == args.hang_in_save:  # the weights are written; the state is not, and never will be
            hanging.set()
            threading.Event().wait()

    ckpt.save_state = before(hang_or_sleep, ckpt.save_state)
    callbacks = [ModelCheckpoint(every_n_steps=3, every_n_epochs=None, keep_last=args.keep_last)]
    if args.hang_in_save:  # the signal comes while the writer hangs (a sync write never does: 10 s, then on)
        callbacks.append(LambdaCallback(on_batch_begin=lambda t, s: t.state.global_step == args.step
                                        and hanging.wait(timeout=10)))
    if args.step is not None:
        callbacks.append(KillAt(args.step, "on_batch_begin", getattr(signal, args.signal)))
    if args.ddp:
        return ddp_main(args, callbacks)
    t = make_resume_trainer(args.out, callbacks=callbacks, **ASYNC)
    state = t.fit()
    committed = [p.name for p in ckpt.committed(t.checkpoint_dir)]
    print(json.dumps({"state": state.to_dict(), "committed_when_fit_returned": committed}))


def ddp_main(args, callbacks):
    if args.stop_at:
        callbacks.append(StopAt(args.stop_at))
    cfg = TrainerConfig(max_epochs=3, batch_size=4, lr=0.01, output_dir=args.out, **ASYNC)
    t = ScheduledRegression(make_model(dropout=0.0), cfg, train_data=make_data(48), val_data=make_data(20),
                            callbacks=callbacks)
    state = t.fit(resume="latest" if args.resume else None)
    report = {"state": state.to_dict(), "committed_when_fit_returned": [p.name for p in ckpt.committed(t.checkpoint_dir)],
              "weights": {k: v.flatten().tolist() for k, v in t.unwrapped_model.state_dict().items()}}
    (Path(args.out) / f"rank{t.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())

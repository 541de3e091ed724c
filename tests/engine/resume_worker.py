"""Run by test_resume.py in a subprocess: train the resume fixture and die (SIGKILL) or get a SIGTERM
at a chosen point, or crash in the middle of writing a checkpoint."""

import argparse
import json
import os
import signal

import torch

import paperloop.checkpoint as ckpt
from tests.support.callbacks import KillAt
from tests.support.engine import ScheduledRegression, ThreeUpdates, make_resume_trainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--hook", default="on_batch_begin")
    p.add_argument("--step", type=int)
    p.add_argument("--kill-in-call", type=int, help="SIGKILL at the start of the Nth training_step call (from 0)")
    p.add_argument("--signal", default="SIGKILL")
    p.add_argument("--three-updates", action="store_true", help="the ThreeUpdates trainer (3 updates a step)")
    p.add_argument("--crash-in-save", type=int, help="SIGKILL halfway through writing the Nth checkpoint")
    args = p.parse_args()
    torch.set_num_threads(1)
    callbacks = []
    if args.step is not None:
        callbacks.append(KillAt(args.step, args.hook, getattr(signal, args.signal)))
    if args.crash_in_save:
        save_state, calls = ckpt.save_state, []

        def crashing_save_state(directory, state):
            calls.append(directory)
            if len(calls) == args.crash_in_save:
                (directory / ckpt.STATE_JSON).write_text('{"half": ')  # a torn write, then the node dies
                os.kill(os.getpid(), signal.SIGKILL)
            save_state(directory, state)

        ckpt.save_state = crashing_save_state
    t = make_resume_trainer(args.out, grad_accum_steps=args.accum, callbacks=callbacks,
                            cls=ThreeUpdates if args.three_updates else ScheduledRegression)
    if args.kill_in_call is not None:  # e.g. between two micro-batches of a step
        training_step, calls = t.training_step, []

        def killing_training_step(batch):
            if len(calls) == args.kill_in_call:
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(1)
            return training_step(batch)

        t.training_step = killing_training_step
    state = t.fit()
    print(json.dumps(state.to_dict()))


if __name__ == "__main__":
    main()

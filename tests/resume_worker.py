"""Run by test_resume.py in a subprocess: train the resume fixture and die (SIGKILL) or get a SIGTERM
at a chosen point, or crash in the middle of writing a checkpoint."""

import argparse
import json
import os
import signal

import torch

import paperloop.checkpoint as ckpt
from helpers import KillAt, make_resume_trainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--hook", default="on_batch_begin")
    p.add_argument("--step", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--signal", default="SIGKILL")
    p.add_argument("--crash-in-save", type=int, help="SIGKILL halfway through writing the Nth checkpoint")
    args = p.parse_args()
    torch.set_num_threads(1)
    callbacks = []
    if args.step is not None:
        callbacks.append(KillAt(args.step, args.hook, args.micro_batch, getattr(signal, args.signal)))
    if args.crash_in_save:
        save_state, calls = ckpt.save_state, []

        def crashing_save_state(directory, state):
            calls.append(directory)
            if len(calls) == args.crash_in_save:
                (directory / ckpt.STATE_JSON).write_text('{"half": ')  # a torn write, then the node dies
                os.kill(os.getpid(), signal.SIGKILL)
            save_state(directory, state)

        ckpt.save_state = crashing_save_state
    t = make_resume_trainer(args.out, grad_accum_steps=args.accum, callbacks=callbacks)
    state = t.fit()
    print(json.dumps(state.to_dict()))


if __name__ == "__main__":
    main()

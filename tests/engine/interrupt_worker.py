"""Run by test_interrupt.py in a subprocess, which sends it SIGINT or SIGTERM mid-run: the README's shape (fit, then
print the results) over many slow steps, printing each finished step.

    python tests/engine/interrupt_worker.py --out DIR [--catch] [--resume]

--catch: catch KeyboardInterrupt and print the trainer's state, as a script that wants to do more after a Ctrl-C."""

import argparse
import json
import time
from pathlib import Path


from tests.support.engine import make_resume_trainer
from paperloop.callbacks import LambdaCallback


def state_line(state) -> str:
    return json.dumps({"interrupted": state.interrupted, "stop_reason": state.stop_reason,
                       "global_step": state.global_step})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--catch", action="store_true")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    def tick(trainer, outputs):
        print(f"step {trainer.state.global_step}", flush=True)
        if not args.resume:
            time.sleep(0.05)  # room for the signal to arrive mid-run

    trainer = make_resume_trainer(args.out, max_epochs=20, callbacks=[LambdaCallback(on_batch_end=tick)])
    try:
        state = trainer.fit(resume="latest" if args.resume else None)
    except KeyboardInterrupt:
        if not args.catch:
            raise
        print("caught " + state_line(trainer.state), flush=True)
        return
    print("results " + state_line(state), flush=True)  # what the README's example prints once fit() returns


if __name__ == "__main__":
    main()

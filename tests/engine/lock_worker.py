"""Run by test_lock.py in a subprocess: the resume fixture sends itself a SIGTERM at step 4, which the trainer
handles (a checkpoint, then a stop); prints the stop reason, whether the output lock was held at the signal, and
whether it is still there after fit() returned."""

import argparse
import os
import signal
from pathlib import Path

from tests.support.engine import make_resume_trainer
from paperloop.callbacks import LambdaCallback
from paperloop.lock import LOCK_NAME


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out = Path(p.parse_args().out)
    lock, held = out / LOCK_NAME, []

    def term(trainer, batch):
        if trainer.state.global_step == 4:
            held.append(os.path.exists(lock))
            os.kill(os.getpid(), signal.SIGTERM)

    state = make_resume_trainer(out, callbacks=[LambdaCallback(on_batch_begin=term)]).fit()
    print(state.stop_reason, held[0], os.path.exists(lock))


if __name__ == "__main__":
    main()

"""Run by test_trackers.py in a subprocess: train the resume fixture (records a step, a validation every 4 steps,
checkpoints every 3) with a tracker logger, and die by SIGKILL at a chosen step or resume from the latest checkpoint.

    python -m tests.engine.tracker_worker --tracker wandb --out /tmp/run [--kill-at 8 | --end-at 8] [--resume]
    python -m tests.engine.tracker_worker --read-trackio RUN     # what trackio's store holds for RUN, as JSON

trackio's store is where TRACKIO_DIR says, read when trackio is first imported: a worker sets it per test.
"""

import argparse
import json
import os
import signal
import time

import torch

from tests.support.callbacks import KillAt, StopAt
from tests.support.engine import ScheduledRegression, make_resume_trainer
from paperloop.callbacks import TrackioLogger, WandbLogger


class Recording(ScheduledRegression):
    """Each step also outputs one record per sample (a row of the tracker's table)."""

    def train_step(self, step):
        outputs = super().train_step(step)
        indices = torch.cat(step.micro_batches).tolist()
        outputs["records/rollouts"] = [{"index": i, "text": f"sample {i}", "reward": i / 10} for i in indices]
        return outputs


class KillWhenStored(KillAt):
    """SIGKILL at the end of `step` once the tracker's store holds it: the killed run's steps past its checkpoint are
    in the store for the resumed run to find (and not log twice)."""

    def __init__(self, step: int, logger):
        super().__init__(step, "on_batch_end")
        self.logger = logger

    def on_batch_end(self, trainer, outputs):
        if trainer.state.global_step == self.step:
            while (self.logger._durable() or 0) < self.step:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)


def tracker(name: str, out: str):
    if name == "wandb":
        return WandbLogger(project="paperloop-test", mode="offline", directory=out)
    return TrackioLogger(project="paperloop-test")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tracker", choices=["wandb", "trackio"])
    p.add_argument("--out")
    p.add_argument("--read-trackio", metavar="RUN")
    p.add_argument("--kill-at", type=int, help="SIGKILL at the end of this step, once the tracker stored it")
    p.add_argument("--kill-before", type=int, help="SIGKILL as this step begins (no waiting)")
    p.add_argument("--end-at", type=int, help="end the run for good after this step (as a kill, but the loggers close)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if args.read_trackio:
        from trackio.sqlite_storage import SQLiteStorage  # trackio's own reader, the one its dashboard uses

        print(json.dumps(SQLiteStorage.get_logs("paperloop-test", args.read_trackio), default=str))
        return
    torch.set_num_threads(1)
    callbacks = [tracker(args.tracker, args.out)]
    if args.kill_at is not None:
        callbacks.append(KillWhenStored(args.kill_at, callbacks[0]))
    if args.kill_before is not None:
        callbacks.append(KillAt(args.kill_before, "on_batch_begin"))
    if args.end_at is not None:
        callbacks.append(StopAt(args.end_at, resumable=False))
    trainer = make_resume_trainer(args.out, cls=Recording, callbacks=callbacks, max_epochs=2, log_every_steps=2,
                                  val_every_steps=4)
    trainer.fit(resume="latest" if args.resume else None)
    print(f"run id: {trainer.state.run_id}")


if __name__ == "__main__":
    main()

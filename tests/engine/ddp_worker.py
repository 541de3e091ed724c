"""Run under torchrun by test_ddp.py: train on 2 CPU processes (gloo), optionally stop with a checkpoint at
a step or resume, and write the final weights, state and per-step losses from rank 0."""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support.callbacks import StopAt
from tests.support.engine import ScheduledRegression, WeightedRegression, make_data, make_indexed_data, make_model
from paperloop import TrainerConfig
from paperloop.callbacks import LambdaCallback


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--stop-at", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--weighted", action="store_true", help="unequal sample weights and plain SGD")
    args = p.parse_args()
    torch.set_num_threads(1)
    losses = []
    callbacks = [LambdaCallback(on_batch_end=lambda t, o: losses.append(float(o["train/loss"])))]
    if args.stop_at is not None:
        callbacks.append(StopAt(args.stop_at, checkpoint=True))

    if args.weighted:
        cfg = TrainerConfig(max_epochs=2, batch_size=args.batch_size, lr=0.05, output_dir=args.out)
        t = WeightedRegression(make_model(dropout=0.0), cfg, train_data=make_indexed_data(44),
                               callbacks=callbacks)
    else:
        cfg = TrainerConfig(max_epochs=3, batch_size=args.batch_size, lr=0.01, output_dir=args.out)
        t = ScheduledRegression(make_model(dropout=0.0), cfg, train_data=make_data(48), val_data=make_data(20),
                                callbacks=callbacks)
    state = t.fit(resume="latest" if args.resume else None)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if t.is_main_process:
        save_file({k: v.contiguous() for k, v in t.unwrapped_model.state_dict().items()},
                  str(Path(args.out) / "final.safetensors"))
        (Path(args.out) / "state.json").write_text(json.dumps({**state.to_dict(), "world_size": t.world_size,
                                                               "step_losses": losses}))


if __name__ == "__main__":
    sys.exit(main())

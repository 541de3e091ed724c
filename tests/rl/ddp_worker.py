"""Run under torchrun by test_trainer.py: RL on 2 CPU processes (gloo). Three runs in one launch (a launch costs
more than the runs): sampling seeded per (step, prompt), to compare with one process holding the same global
batch (and with dynamic sampling, and with a multi-turn environment); then, with the trainer's own per-process sampling, a run stopped with a checkpoint at step 2 and resumed,
and the same run uninterrupted. Rank 0 writes the final weights of each."""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support.callbacks import StopAt
from tests.support.rl import DDP_DAPO, DDP_ENV, DDP_RUN, LayoutFreeEpisodes, SGDRLTrainer, make_rl_trainer


def run(out: Path, name: str, cls, callbacks=(), resume=None, **extra) -> None:
    trainer = make_rl_trainer(out / name, cls=cls, callbacks=callbacks,
                              **{**DDP_RUN, "batch_size": DDP_RUN["batch_size"] // 2, **extra})
    trainer.fit(resume=resume)
    if trainer.is_main_process:
        save_file({k: v.contiguous() for k, v in trainer.unwrapped_model.state_dict().items()},
                  str(out / f"{name}.safetensors"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out = Path(p.parse_args().out)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    run(out, "layout_free", LayoutFreeEpisodes)
    run(out, "layout_free_dapo", LayoutFreeEpisodes, **DDP_DAPO)
    run(out, "layout_free_env", LayoutFreeEpisodes, **DDP_ENV)
    run(out, "straight", SGDRLTrainer)
    run(out, "resumed", SGDRLTrainer, callbacks=[StopAt(2, checkpoint=True)])
    run(out, "resumed", SGDRLTrainer, resume="latest")


if __name__ == "__main__":
    sys.exit(main())

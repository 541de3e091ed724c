"""Run under torchrun by test_fsdp.py: RL with FSDP2 (strategy="fsdp") on 2 CPU processes (gloo), sampling seeded
per prompt (LayoutFreeEpisodes) so that the run compares with one process holding the same global batch. Rank 0
writes the final weights; the processes leave as tests/lm/fsdp_worker.py's do (os._exit, for the reason it gives)."""

import argparse
from pathlib import Path

import torch

from tests.lm.fsdp_worker import leave, write_weights
from tests.support.rl import DDP_RUN, LayoutFreeEpisodes, make_rl_trainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out = Path(p.parse_args().out)
    torch.set_num_threads(1)
    rl = make_rl_trainer(out / "rl", cls=LayoutFreeEpisodes, strategy="fsdp",
                         **{**DDP_RUN, "batch_size": DDP_RUN["batch_size"] // 2})
    rl.fit()
    write_weights(rl, out / "rl.safetensors")
    leave()


if __name__ == "__main__":
    main()

"""Run by test_dpo.py in a subprocess: the DPO fixture (a checkpoint every step), SIGKILLed at a step; or under
torchrun on 2 CPU processes (gloo), the DPO fixture with the global batch of the 1-process run — DDP, or FSDP — and
rank 0 writes the final weights."""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support.callbacks import KillAt
from tests.support.preference import make_dpo, make_pairs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--kill-at-step", type=int, help="SIGKILL in on_batch_begin when global_step == this")
    p.add_argument("--strategy", help="with torchrun: ddp or fsdp; the weights end in out/final.safetensors")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.strategy is None:
        make_dpo(args.out, callbacks=[KillAt(args.kill_at_step)], checkpoint_every_steps=1).fit()
        return
    trainer = make_dpo(args.out, strategy=args.strategy, **DISTRIBUTED)
    trainer.fit()
    weights = trainer.state_dict()["model"]  # FSDP: gathered whole on rank 0
    if trainer.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(args.out) / "final.safetensors"))


# 2 processes x 2 pairs x 2 micro-batches = the 1-process run's 8 pairs a step; RPO's sft term (a token mean over
# the step) and a validation set included
DISTRIBUTED = dict(batch_size=2, grad_accum_steps=2, loss=("sigmoid", "sft"), max_steps=3, val_every_steps=3,
                   lr=0.2, val_data=make_pairs(6, seed=1))


if __name__ == "__main__":
    main()

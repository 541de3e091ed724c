"""Run under torchrun by test_fsdp.py: SFT with FSDP2 (strategy="fsdp") on 2 CPU processes (gloo).

    --what sft        AdamW in float64 (float32 Adam amplifies last-bit differences of tiny gradients near its eps),
                     a checkpoint every 3 steps, straight through
    --what killed     the same run, SIGKILLed on rank 0 at step 4 (after the checkpoint of step 3)
    --what resumed    that run resumed from its latest checkpoint

Rank 0 writes each run's final weights. The processes then leave with os._exit: a gloo FSDP process sometimes
aborts in interpreter teardown after all its work is done (3 in 25 runs here), which would fail a good run."""

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from paperloop import SFTConfig, SFTTrainer
from tests.support.callbacks import KillAt
from tests.support.lm import model, sorting_examples, tokenizer

SFT_RUN = dict(max_length=24, batch_size=8, max_epochs=2, lr=3e-3, checkpoint_every_steps=3)


def sft_trainer(out, processes: int, callbacks=(), **cfg) -> SFTTrainer:
    """The run's global batch is 8, whatever the process count."""
    settings = {**SFT_RUN, "batch_size": SFT_RUN["batch_size"] // processes, "output_dir": str(out), **cfg}
    return SFTTrainer(model().double(), SFTConfig(**settings), tokenizer=tokenizer(), train_data=sorting_examples(44),
                      callbacks=list(callbacks))


def write_weights(trainer, path: Path) -> None:
    state = trainer.state_dict()["model"]  # gathered whole to rank 0 (a collective)
    if trainer.is_main_process:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--what", required=True, choices=["sft", "killed", "resumed"])
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    if args.what == "sft":
        t = sft_trainer(out / "straight", 2, strategy="fsdp")
        t.fit()
        write_weights(t, out / "straight.safetensors")
    elif args.what == "killed":
        sft_trainer(out / "stopped", 2, callbacks=[KillAt(4, "on_batch_end", rank=0)], strategy="fsdp").fit()
    else:
        t = sft_trainer(out / "stopped", 2, strategy="fsdp")
        t.fit(resume="latest")
        write_weights(t, out / "resumed.safetensors")
    leave()


def leave() -> None:
    """Wait for every process, then exit without the interpreter's teardown (see above)."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

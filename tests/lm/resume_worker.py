"""Run by test_sft.py (and test_distill.py, with --teacher: off-policy distillation from a frozen teacher) in a
subprocess: SFT with accumulation, dropout, a warmup+cosine schedule and packing (or length bucketing),
checkpointing every 2 steps, killed by SIGKILL at the start of a chosen step."""

import argparse
import signal

import torch

from tests.support.callbacks import KillAt
from paperloop import SFTConfig, SFTTrainer
from paperloop.models import tiny_causal_lm
from tests.support.lm import VOCAB, sorting_examples, tokenizer


def build(out, packing: bool, bucket_window: int = 0, callbacks=(), teacher: bool = False,
          teacher_seed: int = 3) -> SFTTrainer:
    # Dropout draws from torch's RNG every step, so a resume must restore it too.
    model = tiny_causal_lm(len(VOCAB) + 8, hidden_size=32, num_layers=2, num_heads=2, seed=0, attention_dropout=0.1)
    config = SFTConfig(max_length=24, packing=packing, pack_length=32 if packing else None,
                       bucket_window=bucket_window, batch_size=4, grad_accum_steps=2, max_epochs=2, lr=3e-3,
                       lr_scheduler="cosine", warmup_steps=2, checkpoint_every_steps=2, output_dir=str(out),
                       **(dict(distill="top_k", distill_top_k=5, distill_weight=0.7) if teacher else {}))
    return SFTTrainer(model, config, tokenizer=tokenizer(), train_data=sorting_examples(32), callbacks=list(callbacks),
                      teacher=tiny_causal_lm(len(VOCAB) + 8, hidden_size=48, num_layers=2, num_heads=2, seed=teacher_seed)
                      if teacher else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--bucket-window", type=int, default=0)
    p.add_argument("--teacher", action="store_true", help="distill from a frozen teacher (top_k, mixed with NLL)")
    p.add_argument("--kill-at", type=int, required=True, help="SIGKILL in on_batch_begin at this global_step")
    args = p.parse_args()
    torch.set_num_threads(1)
    build(args.out, args.packing, args.bucket_window, [KillAt(args.kill_at, "on_batch_begin", signal.SIGKILL)],
          args.teacher).fit()


if __name__ == "__main__":
    main()

"""Run under torchrun by test_sft_extras.py: SFT on 2 CPU processes (gloo), padded (batch 4 each), packed (one
micro-batch each), and padded with a teacher (off-policy distillation, half NLL and half forward KL), plain SGD;
rank 0 writes the final weights and every step's loss (and the distillation's divergence)."""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from paperloop import SFTConfig, SFTTrainer
from paperloop.callbacks import LambdaCallback
from tests.support.lm import model, sorting_examples, tokenizer


class SGDTrainer(SFTTrainer):
    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


KD = dict(distill="forward_kl", distill_weight=0.5)


def teacher():
    return model(seed=1)


def build(out, callbacks=(), teacher=None, **cfg) -> SFTTrainer:
    settings = dict(max_length=24, batch_size=4, max_epochs=2, lr=0.1, output_dir=str(out))
    settings.update(cfg)
    if settings.get("packing"):
        settings.setdefault("pack_length", 32)
    return SGDTrainer(model(), SFTConfig(**settings), tokenizer=tokenizer(), train_data=sorting_examples(44),
                      callbacks=list(callbacks), teacher=teacher)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    for name, cfg in (("padded", {}), ("packed", {"packing": True}), ("kd", {**KD, "teacher": teacher()})):
        losses = []
        t = build(Path(args.out) / f"ddp-{name}", callbacks=[LambdaCallback(
            on_batch_end=lambda tr, o: losses.append([float(o[k]) for k in ("train/loss", "distill/kl") if k in o]))],
            **cfg)
        t.fit()
        if t.is_main_process:
            save_file({k: v.contiguous() for k, v in t.unwrapped_model.state_dict().items()},
                      str(Path(args.out) / f"{name}.safetensors"))
            (Path(args.out) / f"{name}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()

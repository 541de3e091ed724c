"""Shared DPO fixtures: addition prompts with a right (chosen) and a wrong (rejected) answer, the RL tests' tiny
Llama and per-character tokenizer, and a DPOTrainer with plain SGD (which, unlike Adam, shows any error in the
gradient's scale). Imported by the DPO tests and the worker script they run (and kill) in a subprocess."""

from __future__ import annotations

import torch

from paperloop.preference import DPOConfig, DPOTrainer

from tests.support.rl import make_lm, make_tokenizer


def make_pairs(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for a, b, off in torch.randint(0, 10, (n, 3), generator=g).tolist():
        wrong = (a + b + 1 + off) % 19
        pairs.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
    return pairs


class SGDDPOTrainer(DPOTrainer):
    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


def make_dpo(out, callbacks=(), model=None, pairs=16, cls=SGDDPOTrainer, val_data=None, **overrides) -> DPOTrainer:
    cfg = dict(batch_size=4, lr=0.5, max_epochs=2, seed=0, output_dir=str(out), beta=0.5)
    cfg.update(overrides)
    return cls(model or make_lm(make_tokenizer()), DPOConfig(**cfg), tokenizer=make_tokenizer(),
               train_data=make_pairs(pairs), val_data=val_data, callbacks=list(callbacks))

"""Shared DPO fixtures: addition prompts with a right (chosen) and a wrong (rejected) answer, the RL tests' tiny
Llama and per-character tokenizer, and a DPOTrainer with plain SGD (which, unlike Adam, shows any error in the
gradient's scale). Imported by the DPO tests and the worker script they run (and kill) in a subprocess."""

from __future__ import annotations

import torch

from paperloop.preference import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

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


def make_reward_model(seed: int = 0, pad_token_id: int = 0):
    """A tiny Llama with a one-label score head, from a config (the RL tests' vocabulary)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(make_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=pad_token_id,
                         initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)


class SGDRewardTrainer(RewardTrainer):
    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


def make_rm(out, callbacks=(), model=None, pairs=16, val_data=None, **overrides) -> RewardTrainer:
    cfg = dict(batch_size=4, lr=0.5, max_epochs=2, seed=0, output_dir=str(out))
    cfg.update(overrides)
    return SGDRewardTrainer(model or make_reward_model(), RewardConfig(**cfg), tokenizer=make_tokenizer(),
                            train_data=make_pairs(pairs), val_data=val_data, callbacks=list(callbacks))

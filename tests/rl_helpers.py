"""Shared RL fixtures: a per-character tokenizer, single-digit addition prompts, a tiny Llama, a partial-credit
reward, and an RLTrainer with plain SGD (which, unlike Adam, shows any error in the gradient's scale). Imported
by test_rl_trainer.py and by the worker scripts it runs (and kills) in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from paperloop import RLConfig, RLTrainer
from paperloop.models.lm import tiny_causal_lm, word_level_tokenizer

DIGITS = list("0123456789+=")


def make_tokenizer():
    return word_level_tokenizer(DIGITS, per_character=True)


def make_prompts(n: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 10, (n, 2), generator=g).tolist()
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


def make_lm(tokenizer, seed: int = 0):
    # initializer_range 0.2: peaked next-token distributions, so EOS comes early in some rows and late in others
    return tiny_causal_lm(len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, seed=seed,
                          initializer_range=0.2)


def digit_reward(prompt, completion, example) -> float:
    """1 for the right answer; otherwise a little credit per correct leading digit (so groups rarely tie)."""
    answer = example["answer"]
    if completion == answer:
        return 1.0
    return 0.1 * sum(a == b for a, b in zip(completion, answer)) - 0.01 * len(completion)


class SGDRLTrainer(RLTrainer):
    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


def make_rl_trainer(out, callbacks=(), cls=SGDRLTrainer, prompts=24, reward_fns=(digit_reward,), model=None,
                    **overrides) -> RLTrainer:
    tok = make_tokenizer()
    cfg = dict(batch_size=4, num_generations=4, max_new_tokens=5, lr=0.05, max_epochs=2, seed=0,
               output_dir=str(out), log_completions=2)
    cfg.update(overrides)
    return cls(model or make_lm(tok), RLConfig(**cfg), tokenizer=tok, train_data=make_prompts(prompts),
               reward_fns=reward_fns, callbacks=list(callbacks))


# The resume tests' runs: 16 prompts, 4 a step, 2 epochs = 8 steps, a checkpoint every 2. "mu2": two passes over
# two minibatches = 4 updates a step, with a KL to the (rebuilt) reference.
RESUME_RUNS = {
    "mu1": dict(prompts=16, checkpoint_every_steps=2),
    "mu2": dict(prompts=16, checkpoint_every_steps=2, inner_epochs=2, minibatch_size=2, beta=0.04),
}


def run_rl_worker(out, *args) -> subprocess.CompletedProcess:
    """rl_worker.py in a subprocess (one thread, like the tests), to SIGKILL it mid-run."""
    worker = Path(__file__).with_name("rl_worker.py")
    return subprocess.run([sys.executable, str(worker), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})

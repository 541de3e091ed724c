"""Shared RL fixtures: a per-character tokenizer, single-digit addition prompts, a tiny Llama, a partial-credit
reward, and an RLTrainer with plain SGD (which, unlike Adam, shows any error in the gradient's scale). Imported
by the RL tests (tests/rl), the FSDP and metrics tests, and by the worker scripts they run (and kill) in
subprocesses."""

from __future__ import annotations

import random

import torch

from paperloop import RLConfig, RLTrainer
from paperloop.envs import Env, StepResult
from paperloop.rl import Episodes
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


def first_digit_reward(prompt, completion, example) -> float:
    """1 when the first character is the answer's first digit: about 3 groups in 10 have a spread at the start, the
    rest tie (dynamic sampling has groups to drop and groups to keep)."""
    return float(completion[:1] == example["answer"][:1])


class SGDRLTrainer(RLTrainer):
    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


def make_rl_trainer(out, callbacks=(), cls=SGDRLTrainer, prompts=24, reward_fns=(digit_reward,), reward_weights=None,
                    model=None, prompt_seed=0, val_data=None, env=None, teacher=None, teacher_tokenizer=None,
                    **overrides) -> RLTrainer:
    tok = make_tokenizer()
    cfg = dict(batch_size=4, num_generations=4, max_new_tokens=5, lr=0.05, max_epochs=2, seed=0,
               output_dir=str(out), log_completions=2)
    cfg.update(overrides)
    if env is not None:
        reward_fns = ()
    return cls(model or make_lm(tok), RLConfig(**cfg), tokenizer=tok, train_data=make_prompts(prompts, prompt_seed),
               reward_fns=reward_fns, reward_weights=reward_weights, callbacks=list(callbacks), val_data=val_data,
               env=env, teacher=teacher, teacher_tokenizer=teacher_tokenizer)


class Retry(Env):
    """Single-digit addition with retries, a multi-turn episode: a wrong answer earns `digit_reward`'s partial credit
    and the observation "<d>=" (d a digit drawn from the episode's seed), the right one 1 and the end. Each episode
    appends what it saw to `Retry.log` when that is a list, so that a test can rebuild its transcript."""

    log = None

    def __init__(self, example):
        self.example = example

    def reset(self, seed):
        self.rng = random.Random(seed)
        self.record = {"seed": seed, "example": self.example, "actions": [], "observations": [], "rewards": []}
        if Retry.log is not None:
            Retry.log.append(self.record)
        return self.example["prompt"]

    def step(self, action):
        done = action == self.example["answer"]
        reward = digit_reward(None, action, self.example)
        observation = "" if done else f"{self.rng.randrange(10)}="
        for key, value in (("actions", action), ("observations", observation), ("rewards", reward)):
            self.record[key].append(value)
        return StepResult(reward=reward, done=done, observation=observation,
                          metrics={"solved": float(done), "action_chars": len(action)})


# The resume tests' runs: 16 prompts, 4 a step, 2 epochs = 8 steps, a checkpoint every 2. "mu2": two passes over
# two minibatches = 4 updates a step, with a KL to the (rebuilt) reference.
RESUME_RUNS = {
    "mu1": dict(prompts=16, checkpoint_every_steps=2),
    "mu2": dict(prompts=16, checkpoint_every_steps=2, inner_epochs=2, minibatch_size=2, beta=0.04),
    # DAPO: up to 3 rounds of prompts a step, 6 steps over 16 prompts (4 plan steps an epoch: some epochs end in the
    # middle of a step's draws)
    "dapo": dict(prompts=16, checkpoint_every_steps=2, dynamic_sampling=True, max_sample_rounds=3, max_steps=6,
                 max_epochs=None, reward_fns=(first_digit_reward,), aggregation="token_mean", clip_high=0.28,
                 overlong_buffer=2),
    # a multi-turn environment: up to 3 actions an episode, two updates a step
    "env": dict(prompts=16, checkpoint_every_steps=2, env=Retry, max_turns=3, inner_epochs=2, minibatch_size=2),
    # asynchronous generation two steps behind: a checkpoint holds a queue of two played, untrained steps
    "async": dict(prompts=16, checkpoint_every_steps=2, async_generation=True, max_lag=2, inner_epochs=2,
                  minibatch_size=2),
}


# The DDP test's run (batch_size is the global one: each of 2 processes takes half): the token-mean normalizer and
# the batch-std advantages both need every process's rollouts; two updates a step, 4 steps.
DDP_RUN = dict(batch_size=4, prompts=16, max_epochs=1, aggregation="token_mean", advantage="batch_std",
               inner_epochs=2, micro_batch_size=3, lr=0.2)
# ... and with DAPO's dynamic sampling: the filter reads every process's rewards, and the kept groups are dealt out
DDP_DAPO = dict(dynamic_sampling=True, max_sample_rounds=2, max_steps=3, reward_fns=(first_digit_reward,))


class ExactRetry(Retry):
    """Retry with a 0/1 reward: an untrained policy's groups mostly tie (dynamic sampling has groups to drop)."""

    def step(self, action):
        result = super().step(action)
        return StepResult(reward=float(result.done), done=result.done, observation=result.observation,
                          metrics=result.metrics)


# Two processes with a multi-turn environment, dynamic sampling and the environment's metrics (all gathered)
DDP_ENV = dict(env=ExactRetry, max_turns=3, dynamic_sampling=True, max_sample_rounds=2, max_steps=3)


class LayoutFreeEpisodes(SGDRLTrainer):
    """Each example's training episodes come from a generator seeded by its first episode's seed (from the run seed,
    the step and the example's index): the same whichever process plays them, so a 2-process run sees exactly the
    rollouts of a 1-process run of the same global batch."""

    def play(self, examples, seeds_N, names, group_size, *, temperature, top_p=1.0, generator=None):
        if generator is not self.sampling_generator:
            return super().play(examples, seeds_N, names, group_size, temperature=temperature, top_p=top_p,
                                generator=generator)
        G = group_size
        return Episodes.concat([
            super(LayoutFreeEpisodes, self).play(examples[p:p + 1], seeds_N[p * G:(p + 1) * G], names[p:p + 1], G,
                                                 temperature=temperature, top_p=top_p,
                                                 generator=torch.Generator().manual_seed(seeds_N[p * G]))
            for p in range(len(examples))])


"""RLTrainer: policy-gradient training of a causal LM on prompts with programmatic rewards (the GRPO family).

    from paperloop import RLConfig, RLTrainer

    def correct(prompt, completion, example):      # a number; raising or NaN is an error naming it
        return float(completion == example["answer"])

    config = RLConfig(batch_size=16, num_generations=8, max_new_tokens=4, lr=1e-4, max_steps=600)
    trainer = RLTrainer(model, config, tokenizer=tok, train_data=[{"prompt": "12+7=", "answer": "19"}, ...],
                        reward_fns=[correct])
    trainer.fit()                                   # after a crash: trainer.fit(resume="latest")

One loop step is one rollout batch (`RLTrainer.train_step`, one method, top to bottom): sample G =
`num_generations` completions for each of the step's `batch_size` prompts (per process) from a sampling
`torch.Generator` the trainer owns and checkpoints; score them; compute group advantages (`paperloop.rl`, pure);
build the shared batch (`input_ids`, `target_tokens`, `weights` = completion mask, `position_ids`,
`advantages`, `sampling_logprobs`); then `inner_epochs` (μ) passes over minibatches of `minibatch_size`
prompts, one optimizer update each, through the engine's `forward_backward` and `optimizer_step`. A run
killed anywhere resumes from its last checkpoint and redraws exactly the same completions, so it ends on
bitwise the same weights.

The recipes of `paperloop.rl` are config values: GRPO (advantage=group_std, aggregation=sequence_mean), DAPO
(token_mean, clip_high=0.28), Dr. GRPO (advantage=none, aggregation=constant). Each update's normalizer is
the whole update's, over every micro-batch and process (token_mean: its trained tokens, all-reduced once a
step), so `micro_batch_size` and the process count change memory and speed, not the update.

A new algorithm's step is written the same way, with the same public pieces: `rollout(indices)` (sample and
score), `Rollouts.batch(advantages_N)`, `forward_backward(batch, share, loss_fn)`, `optimizer_step()`.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .base import BaseTrainer
from .config import ConfigError, TrainerConfig
from .data import EpochSampler, Step
from .lm_data import TokenizedExample, pad_batch, prompt_ids
from .losses import token_entropy, token_logprobs
from .rl import ADVANTAGE_NORMALIZERS, AGGREGATIONS, aggregation_weights, group_advantages, masked_mean, \
    policy_loss, zero_std_fraction
from .sampling import Samples, sample
from .sampling import stop_token_ids as default_stop_ids

__all__ = ["RLConfig", "RLTrainer", "Rollouts", "rollout_batch", "split_rows", "WholeSteps"]

log = logging.getLogger(__name__)

RewardFn = Callable[[object, str, Mapping], float]


@dataclass(frozen=True)
class RLConfig(TrainerConfig):
    """TrainerConfig plus the RL options. `batch_size` counts prompts per rollout batch and process."""

    num_generations: int = 8  # G: completions sampled per prompt, one group
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling and training both use softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: the most probable tokens holding this much mass (1: off)
    beta: float = 0.0  # weight of the k3 KL to the frozen initial policy; 0 builds no reference model
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO's clip-higher: 0.28
    inner_epochs: int = 1  # μ: passes over each rollout batch
    minibatch_size: Optional[int] = None  # prompts per optimizer update (per process); None: batch_size
    micro_batch_size: Optional[int] = None  # completions per forward/backward; None: a whole minibatch
    advantage: str = "group_std"  # "group_std" (GRPO) | "batch_std" | "none" (Dr. GRPO), see paperloop.rl
    aggregation: str = "sequence_mean"  # "sequence_mean" (GRPO) | "token_mean" (DAPO) | "constant" (Dr. GRPO)
    log_completions: int = 4  # sampled completions shown as TensorBoard text at each log (0: none)
    disable_dropout: bool = True  # sampling runs without dropout; training must too, or the ratio is not 1 (TRL: same)

    def __post_init__(self):
        super().__post_init__()
        if self.grad_accum_steps != 1:
            raise ConfigError(f"grad_accum_steps: RLTrainer takes batch_size prompts per step and splits them "
                              f"itself; got {self.grad_accum_steps}, use micro_batch_size to bound memory")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations: must be >= 2 (a group of one has no baseline), got "
                              f"{self.num_generations}")
        for key in ("max_new_tokens", "inner_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 < self.temperature < math.inf:
            raise ConfigError(f"temperature: must be > 0 (training scores softmax(logits / temperature)), got "
                              f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not 0 <= self.beta < math.inf:
            raise ConfigError(f"beta: must be >= 0, got {self.beta}")
        if not 0 <= self.clip_low < 1 or not 0 <= self.clip_high < math.inf:
            raise ConfigError(f"clip_low: must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.minibatch_size is not None and not (1 <= self.minibatch_size <= self.batch_size
                                                    and self.batch_size % self.minibatch_size == 0):
            raise ConfigError(f"minibatch_size: must divide batch_size={self.batch_size}, got {self.minibatch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size: must be >= 1 or null, got {self.micro_batch_size}")
        if self.log_completions < 0:
            raise ConfigError(f"log_completions: must be >= 0, got {self.log_completions}")
        for key, registry in (("advantage", ADVANTAGE_NORMALIZERS), ("aggregation", AGGREGATIONS)):
            if getattr(self, key) not in registry:
                raise ConfigError(f"{key}: unknown {getattr(self, key)!r}; choose one of {sorted(registry)}")

    @property
    def updates_per_step(self) -> int:
        return self.inner_epochs * (self.batch_size // (self.minibatch_size or self.batch_size))


# ---------------------------------------------------------------------------------------------------------------
# Rollouts and the batch built from them (pure)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rollouts:
    """One process's rollout batch: P prompts with G completions each; prompt p's are rows p*G .. p*G+G-1."""

    examples: list  # the prompts' examples, as train_data holds them
    prompt_ids_P: list[list[int]]
    samples: Samples  # completion ids, sampling log-probs, lengths, stopped (EOS) flags
    completions_N: list[str]  # decoded, special tokens skipped: what the reward functions read
    rewards_N_F: torch.Tensor  # (N, F) each reward function's value
    rewards_N: torch.Tensor  # (N,) Σ_f weight_f · reward_f
    pad_id: int
    generate_s: float
    score_s: float

    def batch(self, advantages_N: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared batch of these rollouts with `advantages_N`: see `rollout_batch`."""
        return rollout_batch(self.prompt_ids_P, self.samples, advantages_N, self.pad_id)


def rollout_batch(prompt_ids_P: list[list[int]], samples: Samples, advantages_N: torch.Tensor,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """N = P * G rows of prompt + completion, right-padded, in `lm_data`'s batch shape plus the RL fields:

        input_ids, target_tokens, position_ids  (N, T)  as `lm_data.pad_batch` builds them
        weights            (N, T) float  1 where the target is a completion token (EOS included), else 0
        advantages         (N,)          one per completion
        sampling_logprobs  (N, T)        the sampler's log-prob of each completion target, 0 elsewhere

    Right padding needs no attention mask: padding comes after every real token of its row.
    """
    G = samples.group_size
    completions_N = samples.completions()
    if len(prompt_ids_P) * G != len(completions_N) or advantages_N.shape != (len(completions_N),):
        raise ValueError(f"{len(prompt_ids_P)} prompts x G={G} do not match {len(completions_N)} completions and "
                         f"advantages of shape {tuple(advantages_N.shape)}")
    rows, starts_N = [], []
    for n, completion in enumerate(completions_N):
        prompt = prompt_ids_P[n // G]
        ids_L = torch.tensor(prompt + completion, dtype=torch.long)
        weights_L = torch.zeros(len(ids_L) - 1)
        weights_L[len(prompt) - 1:] = 1.0  # position i predicts token i + 1: the first completion token's is len - 1
        rows.append(TokenizedExample(n, ids_L[:-1], ids_L[1:], weights_L))
        starts_N.append(len(prompt) - 1)
    batch = pad_batch(rows, pad_id)
    sampling_N_T = torch.zeros(batch["weights"].shape, dtype=samples.logprobs_N_L.dtype)
    for n, (start, completion) in enumerate(zip(starts_N, completions_N)):
        sampling_N_T[n, start:start + len(completion)] = samples.logprobs_N_L[n, :len(completion)]
    device = samples.tokens_N_L.device
    return {**{k: v.to(device) for k, v in batch.items()}, "advantages": advantages_N,
            "sampling_logprobs": sampling_N_T.to(device)}


def split_rows(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive slices of `rows` rows (the last may be shorter), each cut to its longest trained row: the
    columns after every row's last trained target are padding, and skipping them saves their compute."""
    weights_N_T = batch["weights"]
    positions_T = torch.arange(1, weights_N_T.shape[1] + 1, device=weights_N_T.device)
    ends_N = torch.where(weights_N_T != 0, positions_T, 0).amax(dim=1).tolist()  # one host transfer
    parts = []
    for start in range(0, weights_N_T.shape[0], rows):
        width = max(ends_N[start:start + rows])
        parts.append({k: v[start:start + rows, :width] if v.ndim == 2 else v[start:start + rows]
                      for k, v in batch.items()})
    return parts


class WholeSteps(EpochSampler):
    """The default data plan without the epoch's short last step: every step gives every process exactly
    `batch_size` prompts, so every process makes the same number of updates (DDP's all-reduces pair up)."""

    def epoch_steps(self, epoch: int) -> list[torch.Tensor]:
        return [s for s in super().epoch_steps(epoch) if len(s) == self.samples_per_step]

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------

class RLTrainer(BaseTrainer):
    """Policy-gradient training of a transformers causal LM on prompts scored by reward functions.

    `train_data`: a map-style dataset of prompts, each `{"prompt": str, **metadata}` (tokenized with the
    tokenizer's special tokens, e.g. BOS) or `{"messages": [...], **metadata}` (rendered with the chat template
    and `add_generation_prompt=True`). `reward_fns`: `fn(prompt, completion, example) -> number`, where `prompt`
    is the example's "prompt" (or "messages"), `completion` the decoded text without special tokens, `example`
    the whole dict; the total reward is Σ weight · reward (`reward_weights`, default 1 each). A reward function
    that raises or returns a non-finite value stops the run with an error naming it and the example.
    `stop_token_ids`: the ids that end a completion (default: EOS, the tokenizer's and the model's generation
    config's, and the chat template's end-of-turn marker, as `paperloop.sampling.stop_token_ids` finds them).
    `val_data`: prompts scored by greedy completions, as `val/reward`. Every prompt's shape is checked up front.

    The reference model (beta > 0) is a frozen copy of `model` as given here: the initial policy. It is rebuilt,
    not checkpointed, so a resumed run must be built with the same initial model (checked on resume).
    """

    def __init__(self, model: torch.nn.Module, config: RLConfig, tokenizer, train_data=None,
                 reward_fns: Sequence[RewardFn] = (), reward_weights: Sequence[float] | None = None, val_data=None,
                 callbacks=(), stop_token_ids: Sequence[int] | None = None):
        if not isinstance(config, RLConfig):
            raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
        super().__init__(model, config, train_data=train_data, val_data=val_data, callbacks=callbacks)
        self.tokenizer = tokenizer
        self.reward_fns, self.reward_names, weights_F = check_rewards(reward_fns, reward_weights)
        self.reward_weights_F = weights_F.to(self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_token_ids = (list(stop_token_ids) if stop_token_ids is not None
                               else default_stop_ids(tokenizer, self.unwrapped_model))
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            for i in range(len(data) if data is not None else 0):
                check_prompt(data[i], f"{name} example {i}")
        if config.disable_dropout:
            disable_dropout(self.unwrapped_model)
        self.reference = frozen_copy(self.unwrapped_model) if config.beta > 0 else None
        self._reference_sum = None if self.reference is None else weight_checksum(self.reference)
        # Each process draws its own completions; its stream is checkpointed with the RNG state.
        seed = int(np.random.SeedSequence([config.seed, self.rank, 0x5A4D]).generate_state(1)[0])
        self.sampler = self.register_generator("sampling", torch.Generator(device=self.device).manual_seed(seed))

    # ---- one loop step ------------------------------------------------------------------------

    def train_step(self, step: Step) -> dict:
        """Sample, score, advantages, the batch, then μ passes of minibatch updates."""
        c = self.config
        rollouts = self.rollout(torch.cat(step.micro_batches))
        start = time.perf_counter()
        rewards_N_F = self.gather(rollouts.rewards_N_F)  # every process's rows, in rank order
        rewards_N = rewards_N_F @ self.reward_weights_F
        advantages_N = group_advantages(rewards_N, c.num_generations, c.advantage)
        batch = rollouts.batch(advantages_N.chunk(self.world_size)[self.rank])
        rows_per_update = (c.minibatch_size or c.batch_size) * c.num_generations
        minibatches = [split_rows(minibatch, c.micro_batch_size or rows_per_update)
                       for minibatch in split_rows(batch, rows_per_update)]
        shares = self.update_shares(minibatches)
        self.add_fixed_logprobs(minibatches)
        updates = [self.update(micro_batches, micro_shares) for _ in range(c.inner_epochs)
                   for micro_batches, micro_shares in zip(minibatches, shares)]
        return self.step_outputs(rollouts, rewards_N_F, rewards_N, updates, time.perf_counter() - start)

    def rollout(self, indices: torch.Tensor) -> Rollouts:
        """Sample G completions for each train prompt at `indices` (this process's), decode and score them."""
        examples = self.fetch(indices)
        names = [f"train example {i}" for i in indices.tolist()]
        prompt_ids_P = [self.prompt_ids(example, name) for example, name in zip(examples, names)]
        start = time.perf_counter()
        samples = self.generate(prompt_ids_P, self.config.num_generations, self.config.temperature)
        generated = time.perf_counter()
        completions_N = self.tokenizer.batch_decode(samples.completions(), skip_special_tokens=True)
        rewards_N_F = self.score(examples, completions_N, names)
        return Rollouts(examples, prompt_ids_P, samples, completions_N, rewards_N_F,
                        rewards_N_F @ self.reward_weights_F, self.pad_id, generated - start,
                        time.perf_counter() - generated)

    def generate(self, prompt_ids_P: list[list[int]], num_samples: int, temperature: float) -> Samples:
        """KV-cached sampling from the policy, drawing only from the trainer's checkpointed generator."""
        return sample(self.unwrapped_model, prompt_ids_P, num_samples, self.config.max_new_tokens,
                      generator=self.sampler, temperature=temperature, top_p=self.config.top_p,
                      eos_token_id=self.stop_token_ids, pad_token_id=self.pad_id)

    def score(self, examples: list, completions_N: list[str], names: list[str]) -> torch.Tensor:
        """(N, F) rewards: each reward function on each completion (G consecutive per example)."""
        G = len(completions_N) // len(examples)
        rewards_N_F = torch.empty(len(completions_N), len(self.reward_fns))
        for n, completion in enumerate(completions_N):
            example = examples[n // G]
            prompt = example.get("prompt", example.get("messages"))
            for f, (fn, fn_name) in enumerate(zip(self.reward_fns, self.reward_names)):
                rewards_N_F[n, f] = call_reward(fn, fn_name, prompt, completion, example, names[n // G])
        return rewards_N_F.to(self.device)

    def update_shares(self, minibatches: list[list[dict]]) -> list[list[float]]:
        """Each micro-batch's part of its update's normalizer over every process (`paperloop.rl`'s aggregation
        weights: 1 per completion, or its trained tokens for token_mean), all-reduced once for the whole step."""
        c = self.config
        weights_M_K = [torch.stack([aggregation_weights(b["weights"], c.aggregation, c.max_new_tokens).sum()
                                    for b in micro_batches]) for micro_batches in minibatches]
        totals_M = self.reduce_sum(torch.stack([w_K.sum() for w_K in weights_M_K]))
        return [(w_K / total.clamp_min(1e-12)).tolist() for w_K, total in zip(weights_M_K, totals_M)]

    @torch.no_grad()
    def add_fixed_logprobs(self, minibatches: list[list[dict]]) -> None:
        """Log-probs that stay fixed through the step's updates, from no-grad forwards over the very micro-batches
        the updates take (same layout, so the same numbers as a training forward): `old_logprobs` when the step
        makes several updates (generation-time log-probs differ from a forward's in the last bits), and
        `ref_logprobs` when beta > 0. With one update, the training forward's own log-probs are the old ones."""
        several = self.config.updates_per_step > 1
        for batch in (b for micro_batches in minibatches for b in micro_batches):
            if several:
                batch["old_logprobs"] = self.forward_logprobs(self.unwrapped_model, batch)[0]
            if self.reference is not None:
                batch["ref_logprobs"] = self.forward_logprobs(self.reference, batch)[0]

    def update(self, micro_batches: list[dict], shares: list[float]) -> tuple[dict, list[dict]]:
        """One optimizer update over a minibatch: forward_backward of each micro-batch with its share."""
        last = len(micro_batches) - 1
        parts = [self.forward_backward(batch, share, sync=i == last)
                 for i, (batch, share) in enumerate(zip(micro_batches, shares))]
        for part, batch in zip(parts, micro_batches):
            part["tokens"] = batch["weights"].sum()
        return self.optimizer_step(), parts

    def training_step(self, batch: dict) -> dict:
        """The policy loss of one micro-batch of rollouts, and its metrics (`forward_backward` calls this)."""
        c = self.config
        logprobs_B_T, logits_B_T_V = self.forward_logprobs(self.model, batch)
        # One update per rollout batch: the policy that sampled is the one trained, so its own log-probs, detached,
        # are the old ones (ratio exactly 1, gradient that of the plain policy gradient).
        old_B_T = batch["old_logprobs"] if "old_logprobs" in batch else logprobs_B_T.detach()
        loss, metrics = policy_loss(logprobs_B_T, old_B_T, batch["advantages"], batch["weights"], c.clip_low,
                                    c.clip_high, c.aggregation, c.max_new_tokens, batch.get("ref_logprobs"),
                                    c.beta, entropy_B_T=token_entropy(logits_B_T_V))
        # How far the sampler's log-probs (KV-cached, batched differently) are from the trainer's: numerical noise
        # (~1e-7 in float32); a large value means sampling and training disagree on the policy.
        metrics["policy/sampler_logprob_gap"] = masked_mean((old_B_T - batch["sampling_logprobs"]).abs(),
                                                            batch["weights"])
        return {"loss": loss, **metrics}

    def forward_logprobs(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (B, T) of the targets, logits (B, T, V)) under softmax(logits / temperature), the
        distribution the completions were sampled from. `use_cache=False`: see `losses.forward_logprobs`."""
        with self.autocast():
            logits_B_T_V = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 use_cache=False).logits
        if self.config.temperature != 1.0:
            logits_B_T_V = logits_B_T_V / self.config.temperature
        return token_logprobs(logits_B_T_V, batch["target_tokens"]), logits_B_T_V

    # ---- outputs ------------------------------------------------------------------------------

    def step_outputs(self, rollouts: Rollouts, rewards_N_F: torch.Tensor, rewards_N: torch.Tensor, updates: list,
                     train_s: float) -> dict:
        """What on_batch_end gets: the updates' losses, rewards and rollout statistics over every process,
        policy metrics, timings, and a few completions as text."""
        c = self.config
        optimizer_outputs = [outputs for outputs, _ in updates]
        lengths_N = self.gather(rollouts.samples.lengths_N.float())
        stopped_N = self.gather(rollouts.samples.stopped_N.float())
        loss = torch.stack([o["train/loss"] for o in optimizer_outputs]).mean()
        step_s = rollouts.generate_s + rollouts.score_s + train_s
        outputs = {
            "train/loss": loss, "policy/loss": loss,
            "train/finite": all(o["train/finite"] for o in optimizer_outputs),
            "optim/lr": optimizer_outputs[-1]["optim/lr"],
            "reward/mean": rewards_N.mean(), "reward/std": rewards_N.std(),
            **{f"reward/{name}": rewards_N_F[:, f].mean() for f, name in enumerate(self.reward_names)},
            "rollout/zero_std_frac": zero_std_fraction(rewards_N, c.num_generations),
            "rollout/completion_len": lengths_N.mean(), "rollout/stopped_frac": stopped_N.mean(),
            **self.policy_metrics([part for _, parts in updates for part in parts]),
            "time/generate_s": rollouts.generate_s, "time/reward_s": rollouts.score_s, "time/train_s": train_s,
            "perf/completions_per_s": len(rewards_N) / step_s,
        }
        if "optim/grad_norm" in optimizer_outputs[0]:  # when clipping, or when a log may be due
            outputs["optim/grad_norm"] = torch.stack([o["optim/grad_norm"] for o in optimizer_outputs]).mean()
        if c.log_completions:
            outputs["text/samples"] = completions_text(rollouts, c.log_completions)
        return outputs

    def policy_metrics(self, parts: list[dict]) -> dict:
        """Token-weighted means of the micro-batches' policy metrics over every update and process."""
        keys = sorted(k for k in parts[0] if k.startswith("policy/"))
        sums = torch.stack([sum(p[k] * p["tokens"] for p in parts) for k in keys] + [sum(p["tokens"] for p in parts)])
        *totals, tokens = self.reduce_sum(sums).unbind()
        return {k: total / tokens.clamp_min(1) for k, total in zip(keys, totals)}

    def validation_step(self, batch: list) -> dict:
        """Greedy completions of the validation prompts, scored: `val/reward` (weighted total), `val/reward/<fn>`,
        `val/completion_len`."""
        prompt_ids_P = [self.prompt_ids(example, "validation example") for example in batch]
        samples = self.generate(prompt_ids_P, 1, temperature=0.0)  # greedy: draws nothing from the generator
        completions_N = self.tokenizer.batch_decode(samples.completions(), skip_special_tokens=True)
        rewards_N_F = self.score(batch, completions_N, [f"validation example {p!r:.60}" for p in prompt_ids_P])
        return {"reward": (rewards_N_F @ self.reward_weights_F).mean(),
                "completion_len": samples.lengths_N.float().mean(),
                **{f"reward/{name}": rewards_N_F[:, f].mean() for f, name in enumerate(self.reward_names)}}

    # ---- engine hooks -------------------------------------------------------------------------

    def collate(self, samples: list) -> list:
        return samples  # prompts stay examples; rollout() tokenizes them

    def make_plan(self) -> WholeSteps:
        c = self.config
        if len(self.train_data) < c.batch_size * self.world_size:
            raise ValueError(f"train_data has {len(self.train_data)} prompts, fewer than one step's "
                             f"{c.batch_size} x {self.world_size} process(es)")
        return WholeSteps(len(self.train_data), c.batch_size, 1, self.world_size, self.rank, c.seed, c.shuffle)

    def total_updates(self) -> int:
        """A step makes μ passes over its minibatches, each an optimizer update: the schedule spans them all."""
        return self.total_steps() * self.config.updates_per_step

    def extra_state(self) -> dict:
        return {} if self._reference_sum is None else {"reference_checksum": self._reference_sum}

    def load_extra_state(self, state: dict) -> None:
        saved = state.get("reference_checksum")
        if self._reference_sum is not None and saved is not None and not torch.allclose(
                saved.to(self._reference_sum), self._reference_sum, rtol=1e-9, atol=0):
            raise ValueError("reference model: this run's initial model is not the one the checkpointed run started "
                             "from (the frozen reference is rebuilt from the model given to RLTrainer); build the "
                             "trainer with the same initial model, not with trained weights")

    # ---- helpers ------------------------------------------------------------------------------

    def prompt_ids(self, example, name: str) -> list[int]:
        """The token ids a completion continues: a "prompt" string with the tokenizer's special tokens (BOS), or
        chat "messages" rendered with `add_generation_prompt=True`."""
        return prompt_ids(example[check_prompt(example, name)], self.tokenizer)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of `tensor`, concatenated in rank order."""
        return self.accelerator.gather(tensor) if self.world_size > 1 else tensor


def check_rewards(reward_fns, reward_weights) -> tuple[list, list[str], torch.Tensor]:
    """(functions, unique metric names, (F,) float32 weights), or a ValueError naming what is wrong."""
    fns = list(reward_fns)
    if not fns or not all(callable(fn) for fn in fns):
        raise ValueError("reward_fns: give a non-empty list of functions fn(prompt, completion, example) -> float")
    names = [getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", type(fn).__name__)
             for fn in fns]
    names = [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
    weights = [1.0] * len(fns) if reward_weights is None else list(reward_weights)
    if len(weights) != len(fns) or not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ValueError(f"reward_weights: one finite number per reward function ({len(fns)}), got {reward_weights!r}")
    return fns, names, torch.tensor(weights, dtype=torch.float32)


def call_reward(fn, fn_name: str, prompt, completion: str, example, where: str) -> float:
    """fn(prompt, completion, example) as a float; an exception or a non-finite value is an error naming the
    function and the example, never a silent 0."""
    try:
        value = fn(prompt, completion, example)
    except Exception as e:
        raise RuntimeError(f"reward function {fn_name!r} raised {type(e).__name__} on {where} (prompt "
                           f"{prompt!r:.80}, completion {completion!r:.80}): {e}") from e
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"reward function {fn_name!r} returned {value!r:.40} on {where} (prompt {prompt!r:.80}, "
                         f"completion {completion!r:.80}): a reward is a finite number")
    return float(value)


def check_prompt(example, name: str) -> str:
    """Which shape an RL prompt has, "prompt" or "messages"; anything else is an error naming the example."""
    if isinstance(example, Mapping) and isinstance(example.get("prompt"), str) and example["prompt"]:
        return "prompt"
    if isinstance(example, Mapping) and isinstance(example.get("messages"), list) and example["messages"]:
        return "messages"
    found = sorted(example) if isinstance(example, Mapping) else type(example).__name__
    raise ValueError(f"{name}: an RL prompt is a dict with a non-empty 'prompt' string or 'messages' list; got {found}")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer (nn.Dropout modules, and transformers attention's `attention_dropout` rate):
    completions are sampled in eval mode, so a training forward with dropout would score other log-probs than
    the sampler's, and the PPO ratio would not be 1 before any update."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def weight_checksum(model: torch.nn.Module) -> torch.Tensor:
    """A float64 fingerprint of the weights (position-weighted sum of per-tensor sums), cheap to compare."""
    sums_K = torch.stack([t.detach().double().sum().cpu() for t in model.state_dict().values()])
    return (sums_K * torch.arange(1, len(sums_K) + 1, dtype=torch.float64)).sum()


def completions_text(rollouts: Rollouts, count: int) -> str:
    """The first `count` completions with their rewards, as a markdown table (TensorBoard renders it)."""
    G = rollouts.samples.group_size
    lines = ["| prompt | completion | reward |", "|---|---|---|"]
    for n in range(min(count, len(rollouts.completions_N))):
        example = rollouts.examples[n // G]
        prompt = str(example.get("prompt", example.get("messages")))
        cells = [text.replace("|", "\\|").replace("\n", " ") for text in (prompt, rollouts.completions_N[n])]
        lines.append(f"| {cells[0]} | {cells[1]} | {float(rollouts.rewards_N[n]):.4g} |")
    return "\n".join(lines)

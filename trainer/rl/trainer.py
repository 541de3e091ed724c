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
`torch.Generator` the trainer owns and checkpoints; score them; compute group advantages (`rl.advantages`, pure);
build the shared batch (`input_ids`, `target_tokens`, `weights` = completion mask, `position_ids`,
`advantages`, `sampling_logprobs`); then `inner_epochs` (μ) passes over minibatches of `minibatch_size`
prompts, one optimizer update each, through the engine's `update`. A run killed anywhere resumes from its last
checkpoint and redraws exactly the same completions, so it ends on bitwise the same weights.

The recipes of `paperloop.rl` are config values: GRPO (advantage=group_std, aggregation=sequence_mean), DAPO
(token_mean, clip_high=0.28, dynamic_sampling, overlong_buffer), Dr. GRPO (advantage=none, aggregation=constant),
GSPO, CISPO and SAPO (`policy_loss`, a name in `rl.losses.POLICY_LOSSES`, default `ppo_clip`). Each update's
normalizer is the whole update's, over every micro-batch and process (token_mean: its trained tokens, all-reduced
once a step), and so are the entropy bonus's and the top-entropy quantile: `micro_batch_size` and the process
count change memory and speed, not the update. With `dynamic_sampling` a step may draw several rounds of prompts
(`sample_step`); the data plan's position moves past all of them, so a resumed run draws the same ones.

Multi-turn episodes: `RLTrainer(..., env=factory)` plays G episodes of each example in `factory(example)`
environments (`paperloop.envs`), each turn continuing the KV cache, and trains on the transcripts with the
environment's tokens at weight 0 (`rl.envs`, `rl.rollouts.transcript_batch`); everything above applies unchanged.

A new algorithm's step is written the same way, with the same public pieces: `rollout(indices)` (sample and
score, or play), `Rollouts.batch(advantages_N)`, `update(batches, shares, loss_fn)`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import ConfigError
from ..plans import Step, check_dataset, mixed_seed
from ..lm.base import LMConfig, LMTrainer, call_scorer, digest
from .envs import Episodes, env_name, episode_seed, play
from ..lm.data import check_messages, prompt_ids
from ..lm.sampling import Samples
from .advantages import ADVANTAGE_NORMALIZERS, group_advantages, group_spread, overlong_penalty, zero_std_fraction
from .losses import AGGREGATIONS, POLICY_LOSSES, LossOptions, aggregation_weights, masked_mean, policy_loss
from .metrics import pass_at_k
from .rollouts import Rollouts, WholeStepsPlan, concat_samples, split_rows, take_groups
from accelerate.utils import gather_object

__all__ = ["RLConfig", "RLTrainer"]

log = logging.getLogger(__name__)

RewardFn = Callable[[object, str, Mapping], float]

# The "step" in validation episodes' seeds: past any real step, so that no training episode shares a seed with one.
VALIDATION_STEP = 2 ** 62

# logits / temperature must stay finite in float32 and bfloat16 (~3e38) for logits of any size a model produces.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class RLConfig(LMConfig):
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
    policy_loss: str = "ppo_clip"  # the per-token loss, a name in paperloop.rl.POLICY_LOSSES
    advantage: str = "group_std"  # "group_std" (GRPO) | "batch_std" | "none" (Dr. GRPO), see paperloop.rl
    aggregation: str = "sequence_mean"  # "sequence_mean" (GRPO) | "token_mean" (DAPO) | "constant" (Dr. GRPO)
    delta: Optional[float] = None  # ppo_clip: the unclipped ratio capped at delta > 1 + clip_high (INTELLECT-2)
    sapo_tau_pos: float = 1.0  # sapo: the gate's temperature for positive advantages
    sapo_tau_neg: float = 1.05  # sapo: for negative ones
    entropy_coef: float = 0.0  # entropy bonus: minus entropy_coef x the mean entropy per trained token
    top_entropy_quantile: float = 1.0  # only this top fraction of the update's tokens by entropy carries the policy
    #                                    gradient (Wang et al. 2025: 0.2); 1: every token
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards all tie, draw more prompts to fill the step
    max_sample_rounds: int = 10  # dynamic sampling: at most this many draws of batch_size prompts per step
    mask_truncated: bool = False  # DAPO: completions that hit max_new_tokens without a stop token get weight 0
    #                               (with an environment: episodes cut by max_turns)
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last this-many tokens (0: off)
    overlong_penalty: float = 1.0  # its reward at max_new_tokens: -overlong_penalty
    eval_num_generations: int = 0  # validate(): n sampled completions per prompt for val/pass@k (0: greedy only)
    eval_temperature: float = 1.0  # their temperature
    eval_pass_threshold: float = 1.0  # a sampled completion passes when its total reward is at least this
    max_turns: int = 1  # with an environment (RLTrainer(env=...)): at most this many actions an episode
    log_completions: int = 4  # rollouts written per logged step: TensorBoard text and rollouts.jsonl (0: none)
    disable_dropout: bool = True  # sampling runs without dropout; training must too, or the ratio is not 1 (TRL: same)

    # micro_batch_size bounds memory and changes rounding only; the eval_* keys change what validation measures,
    # not what trains: a resume may change them.
    resume_may_change = LMConfig.resume_may_change + ("log_completions", "micro_batch_size", "eval_num_generations",
                                                      "eval_temperature", "eval_pass_threshold")

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
        if not MIN_TEMPERATURE <= self.temperature < math.inf:
            raise ConfigError(f"temperature: must be >= {MIN_TEMPERATURE:g} (training scores softmax(logits / "
                              "temperature), and a smaller one makes logits overflow to inf), got "
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
        for key, registry in (("policy_loss", POLICY_LOSSES), ("advantage", ADVANTAGE_NORMALIZERS),
                              ("aggregation", AGGREGATIONS)):
            if getattr(self, key) not in registry:
                raise ConfigError(f"{key}: unknown {getattr(self, key)!r}; choose one of {sorted(registry)}")
        try:
            self.loss_options
        except ValueError as e:
            raise ConfigError(str(e).replace(" must ", ": must ", 1)) from None
        if not 0 <= self.entropy_coef < math.inf:
            raise ConfigError(f"entropy_coef: must be a finite number >= 0, got {self.entropy_coef}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ConfigError(f"top_entropy_quantile: must be in (0, 1] (1: every token), got "
                              f"{self.top_entropy_quantile}")
        if self.top_entropy_quantile < 1 and self.policy_loss == "gspo":
            raise ConfigError("top_entropy_quantile: gspo gives every token of a sequence its one sequence ratio and "
                              "loss, so masking tokens by entropy would only reweight sequences; use it with a "
                              "per-token loss (ppo_clip, cispo, sapo)")
        if self.max_sample_rounds < 1:
            raise ConfigError(f"max_sample_rounds: must be >= 1, got {self.max_sample_rounds}")
        if self.dynamic_sampling and self.max_steps is None:
            raise ConfigError("max_steps: dynamic_sampling=True draws as many prompts a step as the rewards ask, so "
                              "an epoch's number of steps is not known in advance; set max_steps")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ConfigError(f"overlong_buffer: must be in [0, max_new_tokens={self.max_new_tokens}] (0: off), got "
                              f"{self.overlong_buffer}")
        if not 0 <= self.overlong_penalty < math.inf:
            raise ConfigError(f"overlong_penalty: must be a finite number >= 0, got {self.overlong_penalty}")
        if self.eval_num_generations < 0:
            raise ConfigError(f"eval_num_generations: must be >= 0 (0: greedy validation only), got "
                              f"{self.eval_num_generations}")
        if not MIN_TEMPERATURE <= self.eval_temperature < math.inf:
            raise ConfigError(f"eval_temperature: must be >= {MIN_TEMPERATURE:g}, got {self.eval_temperature}")
        if not math.isfinite(self.eval_pass_threshold):
            raise ConfigError(f"eval_pass_threshold: must be a finite number, got {self.eval_pass_threshold}")
        if self.max_turns < 1:
            raise ConfigError(f"max_turns: must be >= 1, got {self.max_turns}")

    @property
    def loss_options(self) -> LossOptions:
        """The policy losses' settings (checked: a ValueError names the bad one)."""
        return LossOptions(clip_low=self.clip_low, clip_high=self.clip_high, delta=self.delta,
                           sapo_tau_pos=self.sapo_tau_pos, sapo_tau_neg=self.sapo_tau_neg)

    @property
    def updates_per_step(self) -> int:
        return self.inner_epochs * (self.batch_size // (self.minibatch_size or self.batch_size))


class RLTrainer(LMTrainer):
    """Policy-gradient training of a transformers causal LM on prompts scored by reward functions.

    `train_data`: a map-style dataset of prompts, each `{"prompt": str, **metadata}` (tokenized with the
    tokenizer's special tokens, e.g. BOS) or `{"messages": [...], **metadata}` (rendered with the chat template
    and `add_generation_prompt=True`). `reward_fns`: `fn(prompt, completion, example) -> number`, where `prompt`
    is the example's "prompt" (or "messages"), `completion` the decoded text without special tokens, `example`
    the whole dict; the total reward is Σ weight · reward (`reward_weights`, default 1 each). A reward function
    that raises or returns a non-finite value stops the run with an error naming it and the example.
    `stop_token_ids`: the ids that end a completion (default: EOS, the tokenizer's and the model's generation
    config's, and the chat template's end-of-turn marker; a resume refuses others). `val_data`: prompts scored
    by greedy completions, as `val/reward`. Every prompt is tokenized and checked up front.

    With `config.lora`, only the adapters train and checkpoints hold only them (as SFTTrainer's). The reference
    model (beta > 0) is the initial policy: a frozen copy of `model` as given here, or with LoRA the base itself
    (the adapters switched off, no copy). It is rebuilt, not checkpointed, so a resumed run must be built with the
    same initial model (checked on resume).

    `env`: a callable `example -> Env` (`paperloop.envs`). Then `train_data` examples are whatever it takes,
    `reward_fns` is empty (an episode's reward is the sum of its steps'), each example's G episodes are played up
    to `max_turns` actions, and `val_data` episodes are played greedily (and sampled, with eval_num_generations).
    """

    def __init__(self, model: torch.nn.Module, config: RLConfig, tokenizer, train_data=None,
                 reward_fns: Sequence[RewardFn] = (), reward_weights: Sequence[float] | None = None, val_data=None,
                 callbacks=(), stop_token_ids: Sequence[int] | None = None, env: Callable | None = None):
        if not isinstance(config, RLConfig):
            raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
        self.env = check_env(env, config, reward_fns, reward_weights)
        if env is None:
            self.reward_fns, self.reward_names, weights_F = check_rewards(reward_fns, reward_weights)
        else:  # the episode's return is the one reward
            self.reward_fns, self.reward_names, weights_F = [], ["env"], torch.ones(1, dtype=torch.float64)
        # Every prompt tokenized up front, before anything is built: a bad one is an error naming it now, not at
        # the step that first samples it; the training prompts' ids are kept for the rollouts. (An environment's
        # first observations exist only once an episode is reset: they are checked then.)
        split = config.split_special_tokens
        self.train_prompt_ids = tokenize_prompts(train_data, tokenizer, "train_data", split) if env is None else []
        val_prompt_ids = tokenize_prompts(val_data, tokenizer, "val_data", split) if env is None else []
        super().__init__(model, config, tokenizer, train_data=train_data, val_data=val_data, callbacks=callbacks,
                         stop_token_ids=stop_token_ids)
        if env is None:
            longest = max(map(len, self.train_prompt_ids + val_prompt_ids), default=0) + config.max_new_tokens
            self.check_positions(longest, "the longest prompt plus max_new_tokens")
        self.reward_weights_F = weights_F.to(self.device)
        _ = self.stop_token_ids  # every rollout needs them: found (or refused) now, not at the first step
        if config.disable_dropout:
            if config.lora is not None and config.lora.dropout:
                log.warning("lora.dropout=%g is switched off with every other dropout (disable_dropout=True: the "
                            "sampled completions must be scored by the same policy that trains)", config.lora.dropout)
            disable_dropout(self.unwrapped_model)
        lora = config.lora is not None
        self.reference = frozen_copy(self.unwrapped_model) if config.beta > 0 and not lora else None
        self._reference_sum = None
        if config.beta > 0:  # the reference's weights: the copy's, or LoRA's frozen base
            frozen = self.reference.parameters() if not lora else (
                p for p in self.unwrapped_model.parameters() if not p.requires_grad)
            self._reference_sum = weight_checksum(frozen)
        # Each process draws its own completions; its stream is checkpointed with the RNG state.
        self.eval_generator = None  # validation's own sampling stream (eval_num_generations), set by evaluate()
        self.sampling_generator = self.register_generator(
            "sampling", torch.Generator(device=self.device).manual_seed(sampling_seed(config.seed, self.rank)))

    def compute_fingerprints(self) -> dict[str, str]:
        """The tokenizer's, the training prompts' (every example, metadata included) and the reward functions'
        (names and weights: a function's code is not seen)."""
        prompts = digest(json.dumps(self.train_data[i], sort_keys=True, default=_jsonable).encode()
                         for i in range(len(self.train_data)))
        rewards = digest([json.dumps([self.reward_names, self.reward_weights_F.tolist()]).encode()])
        stops = digest([json.dumps(self.stop_token_ids).encode()])
        envs = {} if self.env is None else {"env": digest([env_factory_name(self.env).encode()])}
        return {**super().compute_fingerprints(), "train_data": prompts, "reward_fns": rewards,
                "stop_token_ids": stops, **envs}

    # ---- one loop step ------------------------------------------------------------------------

    def train_step(self, step: Step) -> dict:
        """Sample (more rounds with dynamic sampling), score, shape, advantages, the batch, then μ passes of
        minibatch updates."""
        c = self.config
        rollouts, rounds = self.sample_step(torch.cat(step.micro_batches))
        start = time.perf_counter()
        rewards_N_F = self.gather(rollouts.rewards_N_F)  # every process's rows, in rank order
        lengths_N = self.gather(rollouts.lengths_N)
        rewards_N = rewards_N_F @ self.reward_weights_F  # what the reward functions said: the filter's
        shaped_N = rewards_N if not c.overlong_buffer else rewards_N + overlong_penalty(
            lengths_N, c.max_new_tokens, c.overlong_buffer, c.overlong_penalty)
        advantages_N = group_advantages(shaped_N, c.num_generations, c.advantage)
        trained_N = rollouts.stopped_N if c.mask_truncated else None
        batch = rollouts.batch(advantages_N.chunk(self.world_size)[self.rank], trained_N)
        rows_per_update = (c.minibatch_size or c.batch_size) * c.num_generations
        minibatches = [split_rows(minibatch, c.micro_batch_size or rows_per_update)
                       for minibatch in split_rows(batch, rows_per_update)]
        shares = self.update_shares(minibatches)
        self.add_fixed_logprobs(minibatches)
        parts: list[dict] = []  # every micro-batch's policy metrics, for their token-weighted mean

        def loss_fn(micro_batch: dict) -> dict:
            outputs = self.training_step(micro_batch)
            parts.append({**{k: v.detach() for k, v in outputs.items() if k != "loss"},
                          "tokens": micro_batch["weights"].sum()})
            return outputs

        updates = [self.update(micro_batches, micro_shares, loss_fn) for _ in range(c.inner_epochs)
                   for micro_batches, micro_shares in zip(minibatches, shares)]
        outputs = self.step_outputs(rollouts, rewards_N_F, shaped_N, advantages_N, updates, parts,
                                    time.perf_counter() - start)
        outputs.update({"rollout/sample_rounds": rounds,
                        "rollout/prompts_sampled": rounds * c.batch_size * self.world_size})
        return outputs

    def sample_step(self, indices: torch.Tensor) -> tuple[Rollouts, int]:
        """This step's rollouts and the number of sampling rounds they took.

        Without dynamic sampling: G completions of each of the step's prompts, one round. With it (DAPO, Yu et al.
        2025, §3.2): a group whose rewards all tie has advantage 0 and teaches nothing, so each round draws the
        prompts of the data plan's next step, until the rounds hold `batch_size` groups with a spread per process
        (over every process) or `max_sample_rounds` rounds have run or the epoch has no prompts left. The step
        trains on the first groups with a spread, in the order drawn, then (when there are too few) on tied ones
        in that order: always `batch_size` groups a process, so every process makes the same updates. The filter
        reads the rewards the reward functions returned (before any shaping), gathered from every process, so
        every process takes the same decision; the kept groups are dealt out to the processes in order.
        """
        c = self.config
        first = self.rollout(indices)
        if not c.dynamic_sampling:
            return first, 1
        if not callable(getattr(self.plan, "draw_extra", None)):
            raise TypeError(f"dynamic_sampling draws further prompts from the data plan's draw_extra(); "
                            f"{type(self.plan).__name__} (from make_plan) has none: subclass WholeStepsPlan")
        wanted = c.batch_size * self.world_size
        drawn = [first]  # this process's rounds
        rounds = [self.gathered(first)]  # the same rounds, every process's rows: (indices_K, samples, rewards_N_F)
        spread = [group_spread(rounds[0][2] @ self.reward_weights_F, c.num_generations)]
        while int(sum(s.sum() for s in spread)) < wanted and len(rounds) < c.max_sample_rounds:
            more = self.plan.draw_extra()
            if more is None:  # the epoch's prompts are all drawn: train on what there is
                break
            drawn.append(self.rollout(more))
            rounds.append(self.gathered(drawn[-1]))
            spread.append(group_spread(rounds[-1][2] @ self.reward_weights_F, c.num_generations))
        if len(rounds) == 1 and bool(spread[0].all()):
            return first, 1
        spread_K = torch.cat(spread)
        order_K = torch.cat([torch.nonzero(spread_K).flatten(), torch.nonzero(~spread_K).flatten()])[:wanted]
        mine = order_K.chunk(self.world_size)[self.rank].tolist()  # this process's groups, in the order chosen
        chosen_P = torch.cat([r[0] for r in rounds])[mine]
        rewards_N_F = torch.cat([r[2] for r in rounds]).unflatten(0, (len(spread_K), c.num_generations))[mine]
        rewards_N_F = rewards_N_F.flatten(0, 1)
        seconds = sum(r.generate_s for r in drawn), sum(r.score_s for r in drawn)
        if self.env is not None:
            G = c.num_generations
            episodes = Episodes.concat([r[1] for r in rounds]).take([g * G + i for g in mine for i in range(G)])
            return Rollouts(self.fetch(chosen_P), [], None, self.transcripts(episodes), rewards_N_F,
                            rewards_N_F @ self.reward_weights_F, self.pad_id, *seconds, chosen_P, episodes), len(rounds)
        samples = take_groups(concat_samples([r[1] for r in rounds], self.pad_id), mine)
        return Rollouts(self.fetch(chosen_P), [self.train_prompt_ids[i] for i in chosen_P.tolist()], samples,
                        self.tokenizer.batch_decode(samples.completions(), skip_special_tokens=True), rewards_N_F,
                        rewards_N_F @ self.reward_weights_F, self.pad_id, *seconds, chosen_P), len(rounds)

    def gathered(self, rollouts: Rollouts) -> tuple[torch.Tensor, Samples | Episodes, torch.Tensor]:
        """A round's prompt indices (on the CPU), samples (or episodes) and (N, F) rewards from every process, in
        rank order."""
        samples = rollouts.samples or rollouts.episodes
        if self.world_size == 1:
            return rollouts.indices_P, samples, rollouts.rewards_N_F
        if rollouts.episodes is not None:
            return (self.gather(rollouts.indices_P.to(self.device)).cpu(),
                    Episodes.concat(gather_object([rollouts.episodes])), self.gather(rollouts.rewards_N_F))
        pad = self.accelerator.pad_across_processes
        every = Samples(self.gather(pad(samples.tokens_N_L, dim=1, pad_index=self.pad_id)),
                        self.gather(pad(samples.logprobs_N_L, dim=1, pad_index=0)), self.gather(samples.lengths_N),
                        self.gather(samples.stopped_N), group_size=samples.group_size)
        return self.gather(rollouts.indices_P.to(self.device)).cpu(), every, self.gather(rollouts.rewards_N_F)

    def rollout(self, indices: torch.Tensor) -> Rollouts:
        """Sample G completions for each train prompt at `indices` (this process's), decode and score them; with an
        environment, play G episodes of each example."""
        c = self.config
        examples = self.fetch(indices)
        names = [f"train example {i}" for i in indices.tolist()]
        if self.env is not None:
            G = c.num_generations
            seeds = [episode_seed(c.seed, self.state.global_step, i, g) for i in indices.tolist() for g in range(G)]
            start = time.perf_counter()
            episodes = self.play(examples, seeds, names, G, temperature=c.temperature, top_p=c.top_p,
                                 generator=self.sampling_generator)
            rewards_N_F = torch.tensor(episodes.returns_N, dtype=torch.float64, device=self.device)[:, None]
            return Rollouts(examples, [], None, self.transcripts(episodes), rewards_N_F, rewards_N_F[:, 0],
                            self.pad_id, time.perf_counter() - start, 0.0, indices.cpu(), episodes)
        prompt_ids_P = [self.train_prompt_ids[i] for i in indices.tolist()]
        start = time.perf_counter()
        samples = self.generate(prompt_ids_P, c.num_generations, max_new_tokens=c.max_new_tokens,
                                temperature=c.temperature, top_p=c.top_p, generator=self.sampling_generator)
        generated = time.perf_counter()
        completions_N = self.tokenizer.batch_decode(samples.completions(), skip_special_tokens=True)
        rewards_N_F = self.score(examples, completions_N, names)
        return Rollouts(examples, prompt_ids_P, samples, completions_N, rewards_N_F,
                        rewards_N_F @ self.reward_weights_F, self.pad_id, generated - start,
                        time.perf_counter() - generated, indices.cpu())

    def play(self, examples: list, seeds_N: list[int], names: list[str], group_size: int, *, temperature: float,
             top_p: float = 1.0, generator: torch.Generator | None = None) -> Episodes:
        """`group_size` episodes of each example in a fresh environment from `env(example)` (a copy: an environment
        that edits its example must not edit train_data), reset with `seeds_N`, played by the policy."""
        envs = []
        for n, seed in enumerate(seeds_N):
            example, name = examples[n // group_size], names[n // group_size]
            try:
                envs.append(self.env(copy.deepcopy(example)))
            except Exception as e:
                raise RuntimeError(f"env {env_factory_name(self.env)} raised {type(e).__name__} building the "
                                   f"environment of {name}: {e}") from e
        config = getattr(self.unwrapped_model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return play(self.unwrapped_model, self.tokenizer, envs, seeds_N, [names[n // group_size] for n in
                    range(len(seeds_N))], group_size=group_size, max_turns=self.config.max_turns,
                    max_new_tokens=self.config.max_new_tokens, generator=generator or torch.Generator(self.device),
                    temperature=temperature, top_p=top_p, stop_token_ids=self.stop_token_ids,
                    pad_token_id=self.pad_id, max_positions=limit,
                    split_special_tokens=self.config.split_special_tokens)

    def transcripts(self, episodes: Episodes) -> list[str]:
        """Each episode's transcript after its first observation, as text (special tokens kept: the turns' framing)."""
        return self.tokenizer.batch_decode([t[f:] for t, f in zip(episodes.tokens_N, episodes.first_len_N)])

    def score(self, examples: list, completions_N: list[str], names: list[str]) -> torch.Tensor:
        """(N, F) rewards: each reward function on each completion (G consecutive per example)."""
        G = len(completions_N) // len(examples)
        rewards = []  # python floats, made one tensor at the end (writing each into a tensor costs ~15 us)
        for n, completion in enumerate(completions_N):
            example = examples[n // G]
            prompt = example.get("prompt", example.get("messages"))
            where = f"{names[n // G]} (prompt {prompt!r:.80}, completion {completion!r:.80})"
            for fn, fn_name in zip(self.reward_fns, self.reward_names):
                # Copies: a reward function that edits what it is given must not edit train_data (a resumed run,
                # which reads the data afresh, would then score other examples) nor the next function's view.
                rewards.append(call_scorer(fn, copy.deepcopy(prompt), completion, copy.deepcopy(example),
                                           name=f"reward function {fn_name!r}", where=where))
        # float64: rewards are python floats, and their group statistics should not round before the advantages do
        rewards_N_F = torch.tensor(rewards, dtype=torch.float64).reshape(len(completions_N), len(self.reward_fns))
        return rewards_N_F.to(self.device)

    def update_shares(self, minibatches: list[list[dict]]) -> list[list[float]]:
        """Each micro-batch's part of its update's normalizer over every process (`rl.losses`' aggregation
        weights: 1 per completion, or its trained tokens for token_mean), all-reduced once for the whole step.
        With an entropy bonus, each micro-batch also gets its `entropy_normalizer`: the update's trained tokens
        times the micro-batch's share, so that the bonus is the update's mean entropy per token."""
        c = self.config
        weights_M_K = [torch.stack([aggregation_weights(b["weights"].double(), c.aggregation, c.max_new_tokens).sum()
                                    for b in micro_batches]) for micro_batches in minibatches]
        local_tokens_M = torch.stack([sum(b["weights"].double().sum() for b in micro_batches)
                                      for micro_batches in minibatches])
        totals_M, tokens_M = self.reduce_sum(torch.stack([torch.stack([w_K.sum() for w_K in weights_M_K]),
                                                          local_tokens_M]))  # every process's, one all-reduce
        shares = [(w_K / total.clamp_min(1e-12)).tolist() for w_K, total in zip(weights_M_K, totals_M)]
        if c.entropy_coef > 0:
            for micro_batches, micro_shares, tokens in zip(minibatches, shares, tokens_M.tolist()):
                for batch, share in zip(micro_batches, micro_shares):
                    batch["entropy_normalizer"] = share * tokens
        return shares

    @torch.no_grad()
    def add_fixed_logprobs(self, minibatches: list[list[dict]]) -> None:
        """What stays fixed through the step's updates, from no-grad forwards over the very micro-batches the
        updates take (same layout, so the same numbers as a training forward): `old_logprobs` when the step makes
        several updates (generation-time log-probs differ from a forward's in the last bits), `ref_logprobs` when
        beta > 0, and with `top_entropy_quantile` < 1 each token's `entropy` under the policy that sampled and the
        `policy_mask` of the update's highest-entropy tokens. With one update, the training forward's own
        log-probs are the old ones."""
        c = self.config
        several, by_entropy = c.updates_per_step > 1, c.top_entropy_quantile < 1
        for batch in (b for micro_batches in minibatches for b in micro_batches):
            if several or by_entropy:
                scores = self.forward(batch, self.unwrapped_model, c.temperature,
                                      entropy="detached" if by_entropy else None)
                if several:
                    batch["old_logprobs"] = scores.logprobs
                if by_entropy:
                    batch["entropy"] = scores.entropy
            if c.beta > 0:
                batch["ref_logprobs"] = self.reference_logprobs(batch)
        if by_entropy:
            for micro_batches in minibatches:
                self.add_policy_masks(micro_batches)

    def add_policy_masks(self, micro_batches: list[dict]) -> None:
        """`policy_mask` of one update's micro-batches: its trained tokens whose entropy is at least the update's
        (1 - top_entropy_quantile) quantile over every process ("Beyond the 80/20 rule", Wang et al. 2025: the
        high-entropy "forking" tokens carry the policy gradient). TRL takes the quantile per micro-batch, from
        the training forward; here it is the whole update's, from the policy that sampled, so micro-batching
        and the process count do not change which tokens train."""
        entropies_n = torch.cat([b["entropy"][b["weights"] != 0] for b in micro_batches]).double()
        if self.world_size > 1:  # entropies are >= 0: -1 marks the padding that evens out the processes' counts
            entropies_n = self.gather(self.accelerator.pad_across_processes(entropies_n, dim=0, pad_index=-1.0))
            entropies_n = entropies_n[entropies_n >= 0]
        threshold = linear_quantile(entropies_n, 1 - self.config.top_entropy_quantile) if len(entropies_n) else 0.0
        for batch in micro_batches:
            batch["policy_mask"] = (batch["entropy"].double() >= threshold) & (batch["weights"] != 0)

    def reference_logprobs(self, batch: dict) -> torch.Tensor:
        """The reference policy's log-probs of the batch's targets: the frozen copy's, or with LoRA the base's."""
        if self.reference is not None:
            return self.forward(batch, self.reference, self.config.temperature).logprobs
        with self.unwrapped_model.disable_adapter():
            return self.forward(batch, self.unwrapped_model, self.config.temperature).logprobs

    def training_step(self, batch: dict) -> dict:
        """The policy loss of one micro-batch of rollouts, and its metrics."""
        c = self.config
        # An entropy bonus trains the entropy; otherwise it is a metric
        scores = self.forward(batch, temperature=c.temperature, entropy="trained" if c.entropy_coef > 0 else "detached")
        logprobs_B_T = scores.logprobs
        # One update per rollout batch: the policy that sampled is the one trained, so its own log-probs, detached,
        # are the old ones (ratio exactly 1, gradient that of the plain policy gradient).
        old_B_T = batch["old_logprobs"] if "old_logprobs" in batch else logprobs_B_T.detach()
        loss, metrics = policy_loss(logprobs_B_T, old_B_T, batch["advantages"], batch["weights"], loss=c.policy_loss,
                                    aggregation=c.aggregation, max_tokens=c.max_new_tokens, clip_low=c.clip_low,
                                    clip_high=c.clip_high, delta=c.delta, sapo_tau_pos=c.sapo_tau_pos,
                                    sapo_tau_neg=c.sapo_tau_neg, ref_logprobs_B_T=batch.get("ref_logprobs"),
                                    beta=c.beta, entropy_B_T=scores.entropy,
                                    entropy_coef=c.entropy_coef, entropy_normalizer=batch.get("entropy_normalizer"),
                                    policy_mask_B_T=batch.get("policy_mask"))
        # How far the sampler's log-probs (KV-cached, batched differently) are from the trainer's: numerical noise
        # (~1e-7 in float32); a large value means sampling and training disagree on the policy.
        metrics["policy/sampler_logprob_gap"] = masked_mean((old_B_T - batch["sampling_logprobs"]).abs(),
                                                            batch["weights"])
        return {"loss": loss, **metrics}

    # ---- outputs ------------------------------------------------------------------------------

    def step_outputs(self, rollouts: Rollouts, rewards_N_F: torch.Tensor, shaped_N: torch.Tensor,
                     advantages_N: torch.Tensor, updates: list[dict], parts: list[dict], train_s: float) -> dict:
        """What on_batch_end gets: the updates' losses, rewards (as the reward functions returned them) and rollout
        statistics over every process, policy metrics, timings, and a few rollouts as text and as records."""
        c = self.config
        rewards_N = rewards_N_F @ self.reward_weights_F
        lengths_N = self.gather(rollouts.lengths_N.float())
        stopped_N = self.gather(rollouts.stopped_N.float())
        step_s = rollouts.generate_s + rollouts.score_s + train_s
        outputs = {
            "train/loss": torch.stack([u["train/loss"] for u in updates]).mean(),
            "train/finite": all(u["train/finite"] for u in updates),
            "optim/lr": updates[-1]["optim/lr"],
            "reward/mean": rewards_N.mean(), "reward/std": rewards_N.std(),
            **{f"reward/{name}": rewards_N_F[:, f].mean() for f, name in enumerate(self.reward_names)},
            "rollout/zero_std_frac": zero_std_fraction(shaped_N, c.num_generations),
            "rollout/completion_len": lengths_N.mean(), "rollout/stopped_frac": stopped_N.mean(),
            "rollout/truncated_frac": 1 - stopped_N.mean(),
            **self.policy_metrics(parts),
            "time/generate_s": rollouts.generate_s, "time/reward_s": rollouts.score_s, "time/train_s": train_s,
            "perf/completions_per_s": len(rewards_N) / step_s,
        }
        if c.overlong_buffer:
            outputs["reward/overlong_penalty"] = (shaped_N - rewards_N).mean()
        if rollouts.episodes is not None:
            outputs.update(self.episode_metrics(rollouts.episodes))
        if "optim/grad_norm" in updates[0]:  # when clipping, or when a log may be due
            outputs["optim/grad_norm"] = torch.stack([u["optim/grad_norm"] for u in updates]).mean()
        if c.log_completions:
            mine = slice(self.rank * len(rollouts.rewards_N), (self.rank + 1) * len(rollouts.rewards_N))
            outputs["text/samples"] = completions_text(rollouts, c.log_completions)
            outputs["records/rollouts"] = rollout_records(rollouts, self.reward_names, shaped_N[mine],
                                                          advantages_N[mine], c.log_completions)
        return outputs

    def episode_metrics(self, episodes: Episodes) -> dict:
        """Over every process: `rollout/turns_mean`, `rollout/env_tokens_frac` (the share of the transcripts'
        tokens after the first observation that the environment put there) and `env/<key>`, the mean of each
        number the steps reported under that key."""
        totals = torch.tensor([sum(episodes.turns_N), len(episodes), int(episodes.env_tokens_N.sum()),
                               int(episodes.policy_tokens_N.sum())], dtype=torch.float64, device=self.device)
        turns, count, env_tokens, policy_tokens = self.reduce_sum(totals).tolist()
        metrics: dict = {}
        for part in gather_object([episodes.metrics]) if self.world_size > 1 else [episodes.metrics]:
            for key, (total, n) in part.items():
                old = metrics.get(key, (0.0, 0))
                metrics[key] = (old[0] + total, old[1] + n)
        return {"rollout/turns_mean": turns / count,
                "rollout/env_tokens_frac": env_tokens / max(env_tokens + policy_tokens, 1),
                **{f"env/{key}": total / n for key, (total, n) in sorted(metrics.items())}}

    def policy_metrics(self, parts: list[dict]) -> dict:
        """Token-weighted means of the micro-batches' policy metrics over every update and process."""
        keys = sorted(k for k in parts[0] if k.startswith("policy/"))
        sums = torch.stack([sum(p[k] * p["tokens"] for p in parts) for k in keys] + [sum(p["tokens"] for p in parts)])
        *totals, tokens = self.reduce_sum(sums).unbind()
        return {k: total / tokens.clamp_min(1) for k, total in zip(keys, totals)}

    def evaluate(self, dataset, prefix: str = "val", step_fn=None) -> dict:
        """The engine's evaluation; with `eval_num_generations`, its sampled completions come from a generator of
        their own, seeded by (run seed, step, process): evaluating never moves the training stream, and a
        resumed run evaluates exactly as the uninterrupted one did."""
        self.eval_generator = self.new_eval_generator()
        return super().evaluate(dataset, prefix, step_fn)

    def new_eval_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            mixed_seed(self.config.seed, self.state.global_step, self.rank, 0xE7A1))

    def validation_step(self, batch: list) -> dict:
        """Greedy completions of the validation prompts, scored: `val/reward` (weighted total), `val/reward/<fn>`,
        `val/completion_len`. With `eval_num_generations` = n: n completions per prompt sampled at
        `eval_temperature` (no top-p), and `val/pass@k` for k = 1, 2, 4, ..., n (the unbiased estimator of Chen et
        al. 2021; a completion passes when its total reward is at least `eval_pass_threshold`) and
        `val/reward_mean`, their mean total reward. With an environment, the same of its episodes (their returns,
        `completion_len` their policy tokens) and `val/turns_mean`; an example's episodes are reset with seeds
        from (run seed, the example's content), the same at every validation."""
        c = self.config
        rewards_N_F, lengths_N, turns_N = self.score_validation(batch, 1, 0.0, None)
        metrics = {"reward": (rewards_N_F @ self.reward_weights_F).mean(), "completion_len": lengths_N.float().mean(),
                   **{f"reward/{name}": rewards_N_F[:, f].mean() for f, name in enumerate(self.reward_names)}}
        if turns_N is not None:
            metrics["turns_mean"] = turns_N.float().mean()
        n = c.eval_num_generations
        if n:
            if self.eval_generator is None:  # called outside evaluate(): a stream of its own all the same
                self.eval_generator = self.new_eval_generator()
            rewards_N = self.score_validation(batch, n, c.eval_temperature, self.eval_generator)[0] @ self.reward_weights_F
            passed_P = (rewards_N >= c.eval_pass_threshold).reshape(len(batch), n).sum(dim=1).cpu()
            ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
            metrics.update({f"pass@{k}": float(pass_at_k(n, passed_P, k).mean()) for k in ks})
            metrics["reward_mean"] = rewards_N.mean()
        return metrics

    def score_validation(self, batch: list, n: int, temperature: float, generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """n completions (or episodes) of each validation example: (N, F) rewards, (N,) lengths, (N,) turns."""
        c = self.config
        if self.env is not None:
            keys = [int(digest([json.dumps(e, sort_keys=True, default=_jsonable).encode()])[:15], 16) for e in batch]
            names = [f"validation example {e!r:.60}" for e in batch]
            seeds = [episode_seed(c.seed, VALIDATION_STEP, key, g) for key in keys for g in range(n)]
            episodes = self.play(batch, seeds, names, n, temperature=temperature, generator=generator)
            rewards_N_F = torch.tensor(episodes.returns_N, dtype=torch.float64, device=self.device)[:, None]
            return rewards_N_F, episodes.policy_tokens_N, torch.tensor(episodes.turns_N)
        prompt_ids_P = [prompt_of(example, self.tokenizer, "validation example", c.split_special_tokens)
                        for example in batch]
        names = [f"validation example {p!r:.60}" for p in prompt_ids_P]
        samples = self.generate(prompt_ids_P, n, max_new_tokens=c.max_new_tokens, temperature=temperature,
                                generator=generator)
        completions_N = self.tokenizer.batch_decode(samples.completions(), skip_special_tokens=True)
        return self.score(batch, completions_N, names), samples.lengths_N, None

    # ---- engine hooks -------------------------------------------------------------------------

    def collate(self, samples: list) -> list:
        return samples  # prompts stay examples; rollout() tokenizes them

    def make_plan(self) -> WholeStepsPlan:
        c = self.config
        if len(self.train_data) < c.batch_size * self.world_size:
            raise ValueError(f"train_data has {len(self.train_data)} prompts, fewer than one step's "
                             f"{c.batch_size} x {self.world_size} process(es)")
        return WholeStepsPlan(len(self.train_data), c.batch_size, 1, self.world_size, self.rank, c.seed, c.shuffle)

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

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of `tensor`, concatenated in rank order."""
        return self.accelerator.gather(tensor) if self.world_size > 1 else tensor


def linear_quantile(values_n: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile(values_n, q)` (linear interpolation) by a sort: torch.quantile refuses inputs of more than
    2^24 elements, which an update over long transcripts reaches."""
    sorted_n = values_n.sort().values
    position = q * (len(sorted_n) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(sorted_n) - 1)
    return sorted_n[low] + (sorted_n[high] - sorted_n[low]) * (position - low)


def check_env(env, config: RLConfig, reward_fns, reward_weights):
    """The environment factory (or None), checked against what the rest of the arguments say."""
    if env is None:
        if config.max_turns != 1:
            raise ConfigError(f"max_turns: a prompt's completion is one turn; max_turns={config.max_turns} needs an "
                              "environment (RLTrainer(env=...))")
        return None
    if not callable(env):
        raise TypeError(f"env: a callable example -> Env (an Env subclass works), got {type(env).__name__}")
    if config.strategy == "fsdp":
        raise ConfigError("strategy: 'fsdp' with an environment is not supported: every forward of a sharded model "
                          "is a collective, and episodes end after different numbers of turns on each process; "
                          "use strategy='ddp'")
    if list(reward_fns) or reward_weights is not None:
        raise ValueError("reward_fns: with env, an episode's reward is the sum of its steps' rewards; give no "
                         "reward_fns (score the final answer in the environment's step)")
    if config.overlong_buffer:
        raise ConfigError("overlong_buffer: DAPO's overlong punishment measures a completion against max_new_tokens; "
                          "an episode has several actions, each bounded by it: use mask_truncated or a penalty in the "
                          "environment's reward")
    return env


def env_factory_name(env) -> str:
    """What a resume compares: the factory's module and name (its code is not seen)."""
    target = getattr(env, "func", env)  # functools.partial
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"


def check_rewards(reward_fns, reward_weights) -> tuple[list, list[str], torch.Tensor]:
    """(functions, unique metric names, (F,) float64 weights), or a ValueError naming what is wrong."""
    fns = list(reward_fns)
    if not fns or not all(callable(fn) for fn in fns):
        raise ValueError("reward_fns: give a non-empty list of functions fn(prompt, completion, example) -> float")
    names = [getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", type(fn).__name__)
             for fn in fns]
    names = [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
    weights = [1.0] * len(fns) if reward_weights is None else list(reward_weights)
    if len(weights) != len(fns) or not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ValueError(f"reward_weights: one finite number per reward function ({len(fns)}), got {reward_weights!r}")
    return fns, names, torch.tensor(weights, dtype=torch.float64)


def _jsonable(value):
    """A metadata value JSON cannot write, by its content: arrays and tensors as lists, sets sorted, bytes in hex,
    other objects by their repr (a Fraction, a Path, a date) — unless the repr holds a memory address, which would
    differ in every process: then by type alone."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(json.dumps(item, sort_keys=True, default=_jsonable) for item in value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    text = repr(value)
    if re.search(r" at 0x[0-9a-fA-F]+", text):
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return f"<{type(value).__qualname__}> {text}"


def sampling_seed(seed: int, rank: int) -> int:
    """The seed of a process's sampling stream: one per (run seed, process), so processes draw different
    completions of the same prompt."""
    return mixed_seed(seed, rank, 0x5A4D)


def check_prompt(example, name: str) -> str:
    """Which shape an RL prompt has, "prompt" or "messages"; anything else is an error naming the example."""
    if isinstance(example, Mapping) and isinstance(example.get("prompt"), str) and example["prompt"]:
        return "prompt"
    if isinstance(example, Mapping) and isinstance(example.get("messages"), list) and example["messages"]:
        check_messages(example["messages"], name)
        return "messages"
    found = sorted(example) if isinstance(example, Mapping) else type(example).__name__
    raise ValueError(f"{name}: an RL prompt is a dict with a non-empty 'prompt' string or 'messages' list; got {found}")


def prompt_of(example, tokenizer, name: str, split_special_tokens: bool = False) -> list[int]:
    """The token ids a completion of the RL prompt `example` continues, or an error naming it."""
    ids = prompt_ids(example[check_prompt(example, name)], tokenizer, split_special_tokens)
    if not ids:
        raise ValueError(f"{name}: its prompt tokenizes to no tokens at all, so there is nothing to continue")
    return ids


def tokenize_prompts(data, tokenizer, name: str, split_special_tokens: bool = False) -> list[list[int]]:
    """Every prompt of `data` (a map-style dataset, or None) as token ids, each checked."""
    if data is None:
        return []
    return [prompt_of(data[i], tokenizer, f"{name} example {i}", split_special_tokens)
            for i in range(check_dataset(name, data))]


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


def weight_checksum(tensors) -> torch.Tensor:
    """A float64 fingerprint of weights (position-weighted sum of per-tensor sums), cheap to compare."""
    sums_K = torch.stack([t.detach().double().sum().cpu() for t in tensors])
    return (sums_K * torch.arange(1, len(sums_K) + 1, dtype=torch.float64)).sum()


def rollout_records(rollouts: Rollouts, reward_names: list[str], shaped_N: torch.Tensor, advantages_N: torch.Tensor,
                    count: int) -> list[dict]:
    """The first `count` rollouts as JSON-ready dicts (`rollouts.jsonl`): prompt, completion, each reward function's
    value, the total reward the advantages used (shaping included), the advantage, length in tokens, and whether
    it stopped at a stop token or was truncated at max_new_tokens. An episode's prompt is its first observation,
    its completion the transcript after it; it also has its number of turns, and stopped means ended by the
    environment (truncated: by max_turns)."""
    count = min(count, len(rollouts.completions_N))
    rewards = rollouts.rewards_N_F[:count].tolist()
    lengths, stopped = rollouts.lengths_N[:count].tolist(), rollouts.stopped_N[:count].tolist()
    records = []
    for n in range(count):
        records.append({"prompt": prompt_text(rollouts, n), "completion": rollouts.completions_N[n],
                        "rewards": dict(zip(reward_names, rewards[n])), "reward": float(shaped_N[n]),
                        "advantage": float(advantages_N[n]), "length": lengths[n], "stopped": stopped[n],
                        "truncated": not stopped[n]})
        if rollouts.episodes is not None:
            records[-1]["turns"] = rollouts.episodes.turns_N[n]
    return records


def prompt_text(rollouts: Rollouts, n: int):
    """Row n's prompt: the example's "prompt" (or "messages"), or the episode's first observation."""
    if rollouts.episodes is not None:
        return rollouts.episodes.first_N[n]
    example = rollouts.examples[n // rollouts.group_size]
    return example.get("prompt", example.get("messages"))


def completions_text(rollouts: Rollouts, count: int) -> str:
    """The first `count` completions with their rewards, as a markdown table (TensorBoard renders it)."""
    lines = ["| prompt | completion | reward |", "|---|---|---|"]
    for n in range(min(count, len(rollouts.completions_N))):
        cells = [str(text).replace("|", "\\|").replace("\n", " ")
                 for text in (prompt_text(rollouts, n), rollouts.completions_N[n])]
        lines.append(f"| {cells[0]} | {cells[1]} | {float(rollouts.rewards_N[n]):.4g} |")
    return "\n".join(lines)

"""RLTrainer: policy-gradient training of a causal LM on prompts with programmatic rewards, or in environments (the
GRPO family).

    from paperloop import RLConfig, RLTrainer

    def correct(prompt, completion, example):      # a number; raising or NaN is an error naming it
        return float(completion == example["answer"])

    config = RLConfig(batch_size=16, num_generations=8, max_new_tokens=4, lr=1e-4, max_steps=600)
    trainer = RLTrainer(model, config, tokenizer=tok, train_data=[{"prompt": "12+7=", "answer": "19"}, ...],
                        reward_fns=[correct])
    trainer.fit()                                   # after a crash: trainer.fit(resume="latest")

One loop step is one rollout batch (`RLTrainer.train_step`, one method, top to bottom): play G = `num_generations`
episodes of each of the step's `batch_size` examples (per process), drawing from a sampling `torch.Generator` the
trainer owns and checkpoints; compute group advantages of their rewards (`rl.advantages`, pure); build the shared
batch (`rl.rollouts.rollout_batch`: `input_ids`, `target_tokens`, `weights` = the policy's tokens,
`position_ids`, `advantages`, `sampling_logprobs`); then `inner_epochs` (μ) passes over minibatches of
`minibatch_size` examples, one optimizer update each, through the engine's `update`. A run killed anywhere resumes
from its last checkpoint and replays exactly the same episodes, so it ends on bitwise the same weights.

One rollout path. A prompt with reward functions is a one-turn environment (`rl.prompts.PromptEnv`: reset gives the
prompt, step scores the completion), and `RLTrainer(..., env=factory)` plays a user's multi-turn environments
(`paperloop.envs`) up to `max_turns` actions, each turn continuing the KV cache; both become `rl.envs.Episodes`
through `rl.envs.play` and one batch through `rollout_batch`. Where a new rollout feature goes: how an episode is
sampled or stepped, `rl.envs.play` (and `lm.sampling.TurnSampler`, the one decode loop); what a transcript trains
on (per-token weights or rewards, a teacher's term), `Episodes` and `rollout_batch`; where episodes come from,
`rl.prompts.Source`; who plays them, `rl.rollouts.Player` (in the trainer, or with `async_generation` in a process
of its own: `rl.generation`).

The recipes of `paperloop.rl` are config values: GRPO (advantage=group_std, aggregation=sequence_mean), DAPO
(token_mean, clip_high=0.28, dynamic_sampling, overlong_buffer), Dr. GRPO (advantage=none, aggregation=constant),
GSPO, CISPO and SAPO (`policy_loss`, a name in `rl.losses.POLICY_LOSSES`, default `ppo_clip`). Each update's
normalizer is the whole update's, over every micro-batch and process (token_mean: its trained tokens, all-reduced
once a step), and so are the entropy bonus's and the top-entropy quantile: `micro_batch_size` and the process
count change memory and speed, not the update. With `dynamic_sampling` a step may draw several rounds of prompts
(`sample_step`); the data plan's position moves past all of them, so a resumed run draws the same ones.

A new algorithm's step is written the same way, with the same public pieces: `rollout(indices)` (play and score),
`Rollouts.batch(advantages_N)`, `update(batches, shares, loss_fn)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Callable

import torch

from ..config import ConfigError
from ..lm.base import LMTrainer, digest
from ..lm.modules import disable_dropout
from ..plans import Step
from ..rng import mixed_seed
from .advantages import (add_teacher_term, group_advantages, group_spread, lag_weighted, overlong_penalty,
                         zero_std_fraction)
from .config import RLConfig
from .envs import Episodes, episode_seed
from .generation import check_async
from .losses import linear_quantile, masked_mean, policy_loss, update_shares
from .metrics import pass_at_powers
from .prompts import RewardFn, describe_factory, example_json, rollout_source
from .records import completions_text, episode_metrics, policy_metrics, rollout_records, transcript_texts
from .rollouts import Player, Rollouts, WholeStepsPlan, choose_groups, gather_episodes, split_rows

__all__ = ["RLConfig", "RLTrainer"]

log = logging.getLogger(__name__)

# The "step" in validation episodes' seeds: past any real step, so that no training episode shares a seed with one.
VALIDATION_STEP = 2 ** 62


class RLTrainer(LMTrainer):
    """Policy-gradient training of a transformers causal LM on prompts scored by reward functions, or in
    environments.

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
                 callbacks=(), stop_token_ids: Sequence[int] | None = None, env: Callable | None = None,
                 teacher: torch.nn.Module | None = None, teacher_tokenizer=None):
        if not isinstance(config, RLConfig):
            raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
        if teacher is None and (config.distill_coef != 1.0 or config.distill_discount != 0.0):
            raise ConfigError("distill_coef, distill_discount: set, but no teacher was given (RLTrainer(teacher=...))")
        # Where episodes come from, chosen once: everything after this line is the same for prompts and environments
        self.source = rollout_source(config, env, reward_fns, reward_weights, teacher is not None)
        self.reward_names = self.source.names
        # Every prompt checked and tokenized up front, before anything is built: a bad one is an error naming it now,
        # not at the step that first samples it. (An environment's first observations exist only once an episode
        # is reset: they are checked then.)
        split = config.split_special_tokens
        longest = max(self.source.longest(train_data, tokenizer, "train_data", split),
                      self.source.longest(val_data, tokenizer, "val_data", split))
        super().__init__(model, config, tokenizer, train_data=train_data, val_data=val_data, callbacks=callbacks,
                         stop_token_ids=stop_token_ids, reference=config.beta > 0, teacher=teacher,
                         teacher_tokenizer=teacher_tokenizer)
        if longest:
            self.check_positions(longest + config.max_new_tokens, "the longest prompt plus max_new_tokens")
        self.reward_weights_F = self.source.weights_F.to(self.device)
        _ = self.stop_token_ids  # every rollout needs them: found (or refused) now, not at the first step
        if config.disable_dropout:
            if config.lora is not None and config.lora.dropout:
                log.warning("lora.dropout=%g is switched off with every other dropout (disable_dropout=True: the "
                            "sampled completions must be scored by the same policy that trains)", config.lora.dropout)
            disable_dropout(self.unwrapped_model)
        self.player = Player(tokenizer, self.source, config, self.stop_token_ids, self.pad_id)
        self.generation = check_async(config, self.world_size, self.player)
        # Each process draws its own episodes; its stream is checkpointed with the RNG state.
        self.eval_generator = None  # validation's own sampling stream (eval_num_generations), set by evaluate()
        self.sampling_generator = self.register_generator(
            "sampling", torch.Generator(device=self.device).manual_seed(sampling_seed(config.seed, self.rank)))

    def compute_fingerprints(self) -> dict[str, str]:
        """The tokenizer's, the training examples' (every one, metadata included), the reward's parts (names and
        weights: a function's code is not seen), the stop ids', and an environment factory's name."""
        factory = self.source.factory
        envs = {} if factory is None else {"env": digest([describe_factory(factory).encode()])}
        return {**super().compute_fingerprints(),
                "train_data": digest(example_json(self.train_data[i]) for i in range(len(self.train_data))),
                "reward_fns": digest([json.dumps([self.reward_names, self.reward_weights_F.tolist()]).encode()]),
                "stop_token_ids": digest([json.dumps(self.stop_token_ids).encode()]), **envs}

    # ---- one loop step ------------------------------------------------------------------------

    def train_step(self, step: Step) -> dict:
        """Play (more rounds with dynamic sampling), score, shape, advantages, the batch, then μ passes of minibatch
        updates."""
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
        shares = update_shares(minibatches, c.aggregation, c.max_new_tokens, self.reduce_sum, c.entropy_coef > 0)
        self.add_fixed_logprobs(minibatches)
        distill = self.add_distillation(minibatches) if self.teacher is not None else {}
        parts: list[dict] = []  # every micro-batch's policy metrics, for one token-weighted mean over the step

        def loss_fn(micro_batch: dict) -> dict:
            loss, metrics = self.training_step(micro_batch)
            parts.append({**metrics, "tokens": micro_batch["weights"].sum()})
            return {"loss": loss}

        updates = [self.update(micro_batches, micro_shares, loss_fn) for _ in range(c.inner_epochs)
                   for micro_batches, micro_shares in zip(minibatches, shares)]
        if self.generation is not None:
            self.generation.after_step(self.unwrapped_model, self.state.global_step)  # W_{s+1}, and the step it feeds
            distill.update(self.async_metrics)
        outputs = self.step_outputs(rollouts, rewards_N_F, shaped_N, advantages_N, updates, parts,
                                    time.perf_counter() - start)
        outputs.update({"rollout/sample_rounds": rounds,
                        "rollout/prompts_sampled": rounds * c.batch_size * self.world_size, **distill})
        return outputs

    def train(self):
        """The engine's loop; with `async_generation`, between the start and the stop of the generation process."""
        if self.generation is None:
            return super().train()
        self.setup()
        self.generation.start(self.unwrapped_model, self.train_data, self.plan, self.state.global_step,
                              self.total_steps(), self.sampling_generator)
        try:
            return super().train()
        finally:
            self.generation.stop()

    def sample_step(self, indices: torch.Tensor) -> tuple[Rollouts, int]:
        """This step's rollouts and the number of sampling rounds they took.

        Without dynamic sampling: G episodes of each of the step's examples, one round. With it (DAPO, Yu et al.
        2025, §3.2): a group whose rewards all tie has advantage 0 and teaches nothing, so each round draws the
        examples of the data plan's next step (on into the next epoch's: `WholeStepsPlan.draw_extra`), until the
        rounds hold `batch_size` groups with a spread per process (over every process) or `max_sample_rounds` rounds
        have run (or only the next epoch's last step is left). The step
        trains on the first groups with a spread, in the order drawn, then (when there are too few) on tied ones
        in that order (`rollouts.choose_groups`): always `batch_size` groups a process, so every process makes the
        same updates. The filter reads the rewards before any shaping, gathered from every process, so every
        process takes the same decision."""
        c = self.config
        if self.generation is not None:  # played ahead by the generation process
            episodes, self.async_metrics = self.generation.take(self.state.global_step, indices)
            return self.rollouts_of(self.fetch(indices), indices, episodes, self.async_metrics.pop("seconds")), 1
        drawn = [self.rollout(indices)]  # this process's rounds
        if not c.dynamic_sampling:
            return drawn[0], 1
        if not callable(getattr(self.plan, "draw_extra", None)):
            raise TypeError(f"dynamic_sampling draws further prompts from the data plan's draw_extra(); "
                            f"{type(self.plan).__name__} (from make_plan) has none: subclass WholeStepsPlan")
        wanted = c.batch_size * self.world_size
        rewards = [self.gather(drawn[0].rewards_N_F)]  # every process's rows, each round
        spread = [group_spread(rewards[0] @ self.reward_weights_F, c.num_generations)]
        while int(sum(s.sum() for s in spread)) < wanted and len(drawn) < c.max_sample_rounds:
            more = self.plan.draw_extra()
            if more is None:  # this epoch's and the next one's prompts are all drawn: train on what there is
                break
            drawn.append(self.rollout(more))
            rewards.append(self.gather(drawn[-1].rewards_N_F))
            spread.append(group_spread(rewards[-1] @ self.reward_weights_F, c.num_generations))
        if len(drawn) == 1 and bool(spread[0].all()):
            return drawn[0], 1
        mine = choose_groups(torch.cat(spread), wanted, self.world_size, self.rank)
        G = c.num_generations
        rows = [g * G + i for g in mine for i in range(G)]
        chosen_P = torch.cat([self.gather(r.indices_P.to(self.device)).cpu() for r in drawn])[mine]
        local = Episodes.concat([r.episodes for r in drawn])  # this process's metrics and time, every round
        episodes = dataclasses.replace(Episodes.concat([self.gather_episodes(r.episodes) for r in drawn]).take(rows),
                                       metrics=local.metrics, env_s=local.env_s)
        rewards_N_F = torch.cat(rewards)[rows]
        return Rollouts(examples=self.fetch(chosen_P), indices_P=chosen_P, episodes=episodes, rewards_N_F=rewards_N_F,
                        rewards_N=rewards_N_F @ self.reward_weights_F, generate_s=sum(r.generate_s for r in drawn),
                        score_s=sum(r.score_s for r in drawn)), len(drawn)

    def rollout(self, indices: torch.Tensor) -> Rollouts:
        """G episodes of each train example at `indices` (this process's), played and scored."""
        examples = self.fetch(indices)
        episodes, seconds = self.player.rollout(self.play, examples, indices.tolist(), self.state.global_step,
                                                self.sampling_generator)
        return self.rollouts_of(examples, indices, episodes, seconds)

    def rollouts_of(self, examples: list, indices: torch.Tensor, episodes: Episodes, seconds: float) -> Rollouts:
        rewards_N_F = episodes.rewards_N_F.to(self.device)
        return Rollouts(examples=examples, indices_P=indices.cpu(), episodes=episodes, rewards_N_F=rewards_N_F,
                        rewards_N=rewards_N_F @ self.reward_weights_F, generate_s=seconds - episodes.env_s,
                        score_s=episodes.env_s)

    def play(self, examples: list, seeds_N: list[int], names: list[str], group_size: int, *, temperature: float,
             top_p: float = 1.0, generator: torch.Generator | None = None) -> Episodes:
        """`group_size` episodes of each example, reset with `seeds_N`, played by the policy (`Player.play`)."""
        return self.player.play(self.unwrapped_model, examples, seeds_N, names, group_size, temperature=temperature,
                                top_p=top_p, generator=generator)

    # ---- the updates --------------------------------------------------------------------------

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
                batch["ref_logprobs"] = self.reference_logprobs(batch, c.temperature)
        if by_entropy:
            for micro_batches in minibatches:
                self.add_policy_masks(micro_batches)

    @property
    def lagged(self) -> bool:
        """Are the rollouts played by weights older than the ones trained (async, max_lag > 0)?"""
        return self.generation is not None and self.config.max_lag > 0

    @torch.no_grad()
    def add_distillation(self, minibatches: list[list[dict]]) -> dict:
        """On-policy distillation: the teacher scores every sampled token (one no-grad forward per micro-batch, the
        output layer in chunks), and each token's advantage becomes its episode's plus -λ (log π_sampler - log
        π_teacher) (`rl.advantages.add_teacher_term`, with its discounted future terms). Returns the step's
        `distill/reverse_kl` (the mean sampled reverse KL per policy token) and `distill/advantage_share` (the
        teacher term's share of the advantages' magnitude), over every process."""
        c = self.config
        sums = [add_teacher_term(b, self.teacher_logprobs(b), c.distill_coef, c.distill_discount)
                for micro_batches in minibatches for b in micro_batches]
        kl, teacher, episode, tokens = self.reduce_sum(torch.stack(sums).sum(0)).tolist()
        return {"distill/reverse_kl": kl / max(tokens, 1),
                "distill/advantage_share": teacher / max(teacher + episode, 1e-12)}

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

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The policy loss of one micro-batch of rollouts, and its metrics (0-dim tensors)."""
        c = self.config
        # An entropy bonus trains the entropy; otherwise it is a metric
        scores = self.forward(batch, temperature=c.temperature, entropy="trained" if c.entropy_coef > 0 else "detached")
        logprobs_B_T = scores.logprobs
        # One update per rollout batch: the weights at the step's start are the ones trained, so their own log-probs,
        # detached, are π_old (ratio exactly 1, gradient that of the plain policy gradient) — the policy that sampled,
        # unless the rollouts lag behind, which the advantages' weights below correct.
        old_B_T = batch["old_logprobs"] if "old_logprobs" in batch else logprobs_B_T.detach()
        advantages, lag_metrics = batch["advantages"], {}
        if self.lagged:  # sampled by older weights: decoupled PPO's π_old / π_sampler on each token, capped
            advantages, lag_metrics = lag_weighted(advantages, old_B_T, batch["sampling_logprobs"], batch["weights"],
                                                   c.async_is_cap)
        loss, metrics = policy_loss(logprobs_B_T, old_B_T, advantages, batch["weights"], loss=c.policy_loss,
                                    aggregation=c.aggregation, max_tokens=c.max_new_tokens,
                                    ref_logprobs_B_T=batch.get("ref_logprobs"), beta=c.beta,
                                    entropy_B_T=scores.entropy, entropy_coef=c.entropy_coef,
                                    entropy_normalizer=batch.get("entropy_normalizer"),
                                    policy_mask_B_T=batch.get("policy_mask"), **c.loss_settings)
        # How far the sampler's log-probs (KV-cached, batched differently) are from the trainer's: numerical noise
        # (~1e-7 in float32); a large value means sampling and training disagree on the policy.
        metrics["policy/sampler_logprob_gap"] = masked_mean((old_B_T - batch["sampling_logprobs"]).abs(),
                                                            batch["weights"])
        return loss, {**metrics, **lag_metrics}

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
            **policy_metrics(parts, self.reduce_sum),
            **episode_metrics(rollouts.episodes, self.reduce_sum, self.gather_objects, c.max_turns > 1, self.device),
            "time/generate_s": rollouts.generate_s, "time/reward_s": rollouts.score_s, "time/train_s": train_s,
            "perf/completions_per_s": len(rewards_N) / step_s,
        }
        if c.overlong_buffer:
            outputs["reward/overlong_penalty"] = (shaped_N - rewards_N).mean()
        if "optim/grad_norm" in updates[0]:  # when clipping, or when a log may be due
            outputs["optim/grad_norm"] = torch.stack([u["optim/grad_norm"] for u in updates]).mean()
        if c.log_completions:
            mine = slice(self.rank * len(rollouts.rewards_N), (self.rank + 1) * len(rollouts.rewards_N))
            texts = transcript_texts(rollouts.episodes, self.tokenizer, c.log_completions)
            outputs["text/samples"] = completions_text(rollouts, texts)
            outputs["records/rollouts"] = rollout_records(rollouts, texts, self.reward_names, shaped_N[mine],
                                                          advantages_N[mine])
        return outputs

    # ---- validation ---------------------------------------------------------------------------

    def evaluate(self, dataset, prefix: str = "val", step_fn=None) -> dict:
        """The engine's evaluation; with `eval_num_generations`, its sampled episodes come from a generator of
        their own, seeded by (run seed, step, process): evaluating never moves the training stream, and a
        resumed run evaluates exactly as the uninterrupted one did."""
        self.eval_generator = self.new_eval_generator()
        return super().evaluate(dataset, prefix, step_fn)

    def new_eval_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            mixed_seed(self.config.seed, self.state.global_step, self.rank, 0xE7A1))

    def validation_step(self, batch: list) -> dict:
        """Greedy episodes of the validation examples, scored: `val/reward` (weighted total), `val/reward/<part>`,
        `val/completion_len` (the policy's tokens), with max_turns > 1 `val/turns_mean`. With `eval_num_generations`
        = n: n episodes per example sampled at `eval_temperature` (no top-p), and `val/pass@k` for k = 1, 2, 4, ...,
        n (the unbiased estimator of Chen et al. 2021; an episode passes when its total reward is at least
        `eval_pass_threshold`) and `val/reward_mean`, their mean total reward. An example's episodes are reset with
        seeds from (run seed, the example's content), the same at every validation."""
        c = self.config
        greedy = self.validation_episodes(batch, 1, 0.0, None)
        rewards_N_F = greedy.rewards_N_F.to(self.device)
        metrics = {"reward": (rewards_N_F @ self.reward_weights_F).mean(),
                   "completion_len": greedy.policy_tokens_N.float().mean(),
                   **{f"reward/{name}": rewards_N_F[:, f].mean() for f, name in enumerate(self.reward_names)}}
        if c.max_turns > 1:
            metrics["turns_mean"] = greedy.turns_N.float().mean()
        n = c.eval_num_generations
        if n:
            if self.eval_generator is None:  # called outside evaluate(): a stream of its own all the same
                self.eval_generator = self.new_eval_generator()
            sampled = self.validation_episodes(batch, n, c.eval_temperature, self.eval_generator)
            rewards_N = sampled.rewards_N_F.to(self.device) @ self.reward_weights_F
            passed_P = (rewards_N >= c.eval_pass_threshold).reshape(len(batch), n).sum(dim=1).cpu()
            metrics.update({**pass_at_powers(n, passed_P), "reward_mean": rewards_N.mean()})
        return metrics

    def validation_episodes(self, batch: list, n: int, temperature: float, generator: torch.Generator | None
                            ) -> Episodes:
        """n episodes of each validation example, seeded by (run seed, the example's content, generation)."""
        keys = [int(digest([example_json(example)])[:15], 16) for example in batch]
        seeds = [episode_seed(self.config.seed, VALIDATION_STEP, key, g) for key in keys for g in range(n)]
        names = [f"validation example {example!r:.60}" for example in batch]
        return self.play(batch, seeds, names, n, temperature=temperature, generator=generator)

    # ---- engine hooks -------------------------------------------------------------------------

    def collate(self, samples: list) -> list:
        return samples  # examples stay examples: their environments take them

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
        """LMTrainer's (the reference's and teacher's checksums) and, with async generation, the queue of finished,
        untrained steps (awaited first) and the sampler's state (`rl.generation`)."""
        state = super().extra_state()
        if self.generation is not None:
            state["async"] = self.generation.state_dict(self.state.global_step)
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if self.generation is not None and "async" in state:
            self.generation.load_state_dict(state["async"])

    # ---- across processes ---------------------------------------------------------------------

    def gather_episodes(self, episodes: Episodes) -> Episodes:
        """Every process's episodes in rank order (`rollouts.gather_episodes`)."""
        if self.world_size == 1:
            return episodes
        return gather_episodes(episodes, self.gather, self.accelerator.pad_across_processes, self.gather_objects,
                               self.device)


def sampling_seed(seed: int, rank: int) -> int:
    """The seed of a process's sampling stream: one per (run seed, process), so processes draw different
    completions of the same prompt."""
    return mixed_seed(seed, rank, 0x5A4D)


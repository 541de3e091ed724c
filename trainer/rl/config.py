"""RLConfig: TrainerConfig plus the RL options, each checked when the config is built (an error names the key).

The policy loss's own settings (clip range, delta, SAPO's temperatures) are the fields of `rl.losses.LossOptions`,
each a key here of the same name; the loss declares which it reads (`register_policy_loss(..., reads=...)`), and a
setting the chosen loss does not read is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from ..config import ConfigError
from ..lm.base import LMConfig
from .advantages import ADVANTAGE_NORMALIZERS
from .losses import AGGREGATIONS, POLICY_LOSSES, LossOptions, loss_traits

__all__ = ["RLConfig", "MIN_TEMPERATURE"]

# logits / temperature must stay finite in float32 and bfloat16 (~3e38) for logits of any size a model produces.
MIN_TEMPERATURE = 1e-4
LOG_COMPLETIONS = 4  # rollouts logged per logged step by default (log_completions=True)


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
    mask_truncated: bool = False  # DAPO: episodes cut by a budget get weight 0 — a completion (or an episode's last
    #                               action) that hit max_new_tokens without a stop token, an episode cut by max_turns
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last this-many tokens (0: off)
    overlong_penalty: float = 1.0  # its reward at max_new_tokens: -overlong_penalty
    eval_num_generations: int = 0  # validate(): n sampled completions per prompt for val/pass@k (0: greedy only)
    eval_temperature: float = 1.0  # their temperature
    eval_pass_threshold: float = 1.0  # a sampled completion passes when its total reward is at least this
    max_turns: int = 1  # with an environment (RLTrainer(env=...)): at most this many actions an episode
    async_generation: bool = False  # episodes played by a process of their own, from the weights max_lag steps back
    max_lag: int = 1  # k: step s's episodes come from the weights after step s - k (0: the synchronous loop, bitwise)
    async_is_cap: Optional[float] = 2.0  # the lag's importance weight π_old / π_sampler per token, capped (None: not)
    distill_coef: float = 1.0  # with a teacher (RLTrainer(teacher=...)): λ of the per-token -λ (log π - log π_teacher)
    distill_discount: float = 0.0  # γ: each token's term plus the discounted future ones (0: its own only)
    log_completions: Union[int, bool] = LOG_COMPLETIONS  # rollouts shown per log: TensorBoard, rollouts.jsonl (true: 4)
    disable_dropout: bool = True  # sampling runs without dropout; training must too, or the ratio is not 1 (TRL: same)

    # micro_batch_size bounds memory and changes rounding only; the eval_* keys change what validation measures,
    # not what trains: a resume may change them.
    resume_may_change = LMConfig.resume_may_change + ("log_completions", "micro_batch_size", "eval_num_generations",
                                                      "eval_temperature", "eval_pass_threshold")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.log_completions, bool):  # TRL's flag: on (the default count) or off
            object.__setattr__(self, "log_completions", LOG_COMPLETIONS if self.log_completions else 0)
        self._check_sampling()
        self._check_updates()
        self._check_dapo()
        self._check_distillation()
        self._check_async()
        self._check_validation()

    def _check_sampling(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"num_generations: must be >= 2 (a group of one has no baseline), got "
                              f"{self.num_generations}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not MIN_TEMPERATURE <= self.temperature < math.inf:
            raise ConfigError(f"temperature: must be >= {MIN_TEMPERATURE:g} (training scores softmax(logits / "
                              "temperature), and a smaller one makes logits overflow to inf), got "
                              f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_turns < 1:
            raise ConfigError(f"max_turns: must be >= 1, got {self.max_turns}")
        if self.max_turns > 1 and self.strategy == "fsdp":
            raise ConfigError("strategy: 'fsdp' with max_turns > 1 is not supported: every forward of a sharded model "
                              "is a collective, and episodes end after different numbers of turns on each process; "
                              "use strategy='ddp' (one-turn episodes, prompts included, work under fsdp)")

    def _check_updates(self) -> None:
        if self.grad_accum_steps != 1:
            raise ConfigError(f"grad_accum_steps: RLTrainer takes batch_size prompts per step and splits them "
                              f"itself; got {self.grad_accum_steps}, use micro_batch_size to bound memory")
        if self.inner_epochs < 1:
            raise ConfigError(f"inner_epochs: must be >= 1, got {self.inner_epochs}")
        if self.minibatch_size is not None and not (1 <= self.minibatch_size <= self.batch_size
                                                    and self.batch_size % self.minibatch_size == 0):
            raise ConfigError(f"minibatch_size: must divide batch_size={self.batch_size}, got {self.minibatch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size: must be >= 1 or null, got {self.micro_batch_size}")
        if not 0 <= self.beta < math.inf:
            raise ConfigError(f"beta: must be >= 0, got {self.beta}")
        for key, registry in (("policy_loss", POLICY_LOSSES), ("advantage", ADVANTAGE_NORMALIZERS),
                              ("aggregation", AGGREGATIONS)):
            if getattr(self, key) not in registry:
                raise ConfigError(f"{key}: unknown {getattr(self, key)!r}; choose one of {sorted(registry)}")
        try:
            LossOptions(**self.loss_settings)  # each setting's range
        except ValueError as e:
            raise ConfigError(str(e).replace(" must ", ": must ", 1)) from None
        self._check_loss_reads()
        if not 0 <= self.entropy_coef < math.inf:
            raise ConfigError(f"entropy_coef: must be a finite number >= 0, got {self.entropy_coef}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ConfigError(f"top_entropy_quantile: must be in (0, 1] (1: every token), got "
                              f"{self.top_entropy_quantile}")
        if self.top_entropy_quantile < 1 and loss_traits(self.policy_loss).one_per_sequence:
            raise ConfigError(f"top_entropy_quantile: {self.policy_loss} gives every token of a sequence its one "
                              "sequence ratio and loss, so masking tokens by entropy would only reweight sequences; "
                              "use it with a per-token loss (ppo_clip, cispo, sapo)")

    def _check_dapo(self) -> None:
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
        if self.max_turns > 1 and self.overlong_buffer:
            raise ConfigError("overlong_buffer: DAPO's overlong punishment measures a completion against "
                              "max_new_tokens; an episode of max_turns > 1 has several actions, each bounded by it: "
                              "use mask_truncated or a penalty in the environment's reward")

    def _check_async(self) -> None:
        if self.max_lag < 0:
            raise ConfigError(f"max_lag: must be >= 0, got {self.max_lag}")
        if self.async_is_cap is not None and not 1 <= self.async_is_cap < math.inf:
            raise ConfigError(f"async_is_cap: must be a finite number >= 1, or null, got {self.async_is_cap}")
        if self.async_generation and self.dynamic_sampling:
            raise ConfigError("async_generation: not with dynamic_sampling, whose extra rounds depend on the rewards "
                              "of the round before (the steps ahead could not be asked for)")
        if self.async_generation and self.strategy == "fsdp":
            raise ConfigError("async_generation: not with strategy='fsdp' (a sharded policy has no whole copy to "
                              "generate with)")

    def _check_distillation(self) -> None:
        if not 0 <= self.distill_coef < math.inf:
            raise ConfigError(f"distill_coef: must be a finite number >= 0, got {self.distill_coef}")
        if not 0 <= self.distill_discount <= 1:
            raise ConfigError(f"distill_discount: must be in [0, 1], got {self.distill_discount}")

    def _check_validation(self) -> None:
        if self.eval_num_generations < 0:
            raise ConfigError(f"eval_num_generations: must be >= 0 (0: greedy validation only), got "
                              f"{self.eval_num_generations}")
        if not MIN_TEMPERATURE <= self.eval_temperature < math.inf:
            raise ConfigError(f"eval_temperature: must be >= {MIN_TEMPERATURE:g}, got {self.eval_temperature}")
        if not math.isfinite(self.eval_pass_threshold):
            raise ConfigError(f"eval_pass_threshold: must be a finite number, got {self.eval_pass_threshold}")
        if self.log_completions < 0:
            raise ConfigError(f"log_completions: must be >= 0, got {self.log_completions}")

    @property
    def loss_settings(self) -> dict:
        """The policy losses' settings (`rl.losses.LossOptions`' fields, each a key of this config of the same
        name), for `policy_loss(..., **settings)`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LossOptions)}

    def _check_loss_reads(self) -> None:
        """A loss setting changed from its default that the chosen loss does not read would be ignored in silence:
        refused, naming the setting and the loss (each loss declares what it reads when registered)."""
        reads = loss_traits(self.policy_loss).reads
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in self.loss_settings.items():
            if key not in reads and value != defaults[key]:
                raise ConfigError(f"{key}: policy_loss={self.policy_loss!r} does not read it (it reads "
                                  f"{', '.join(reads) or 'no setting'}), so {key}={value!r} would change nothing; "
                                  f"leave it at its default {defaults[key]!r} or choose a loss that reads it")

    @property
    def updates_per_step(self) -> int:
        return self.inner_epochs * (self.batch_size // (self.minibatch_size or self.batch_size))

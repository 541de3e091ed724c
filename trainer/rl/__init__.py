"""paperloop.rl: reinforcement learning for language models (the GRPO family).

    from paperloop.rl import RLTrainer, RLConfig                        # the trainer (also `from paperloop`)
    from paperloop.rl import group_advantages, policy_loss, pass_at_k   # the math: pure functions
    from paperloop.rl import register_policy_loss                       # a paper's own loss, by name

- `advantages.py`: group advantages, one registered function per normalization (`group_std`, `batch_std`, `none`)
- `losses.py`: aggregations (`sequence_mean`, `token_mean`, `constant`) and policy losses (`ppo_clip`, `gspo`,
  `cispo`, `sapo`), registered by name, and `policy_loss`, which combines them with the KL penalty and the entropy
  bonus and reports metrics
- `metrics.py`: pass@k
- `envs.py`: environments (`Env`, `StepResult`, also `paperloop.envs`), `Episodes` and `play`, which runs them: the
  one rollout path (sampling, stepping, the KV cache carried across turns)
- `prompts.py`: where episodes come from (`Source`): a prompt scored by reward functions is a one-turn environment
  (`PromptEnv`); the checks of prompts, reward functions and environment factories
- `rollouts.py`: a step's rollouts with their rewards, the one training batch built from them, the data plan
- `records.py`: a few rollouts as records (`rollouts.jsonl`) and text
- `tools.py`: `ToolEnv`, tool use as an environment (Python functions called from the action, with time limits)
- `adapters.py`: tasks and environments written elsewhere: reasoning-gym's tasks (`reasoning_gym_examples`,
  `reasoning_gym_score`, `ReasoningGymEnv`) and skyrl-gym's text environments (`SkyRLGymEnv`)
- `config.py`: `RLConfig`
- `trainer.py`: `RLTrainer`
"""

from .advantages import (ADVANTAGE_NORMALIZERS, STD_EPS, group_advantages, group_spread, overlong_penalty,
                         register_advantage, zero_std_fraction)
from .losses import (AGGREGATIONS, POLICY_LOSSES, LossOptions, aggregation_weights, cispo, gspo, k3_kl, loss_traits,
                     masked_mean, policy_loss, ppo_clip, register_aggregation, register_policy_loss, sapo)
from .envs import Env, Episodes, StepResult, play
from .metrics import pass_at_k
from .prompts import PromptEnv
from .tools import ToolEnv
from .adapters import ReasoningGymEnv, SkyRLGymEnv, reasoning_gym_examples, reasoning_gym_score
from .rollouts import Rollouts, WholeStepsPlan, rollout_batch, split_rows
from .config import RLConfig
from .trainer import RLTrainer

__all__ = ["group_advantages", "group_spread", "overlong_penalty", "zero_std_fraction", "register_advantage", "ADVANTAGE_NORMALIZERS", "STD_EPS",
           "policy_loss", "ppo_clip", "gspo", "cispo", "sapo", "LossOptions", "loss_traits", "aggregation_weights", "k3_kl", "masked_mean", "register_aggregation",
           "register_policy_loss", "AGGREGATIONS", "POLICY_LOSSES", "pass_at_k", "Rollouts", "WholeStepsPlan",
           "rollout_batch", "split_rows", "RLConfig", "RLTrainer", "Env", "StepResult", "Episodes", "play", "PromptEnv", "ToolEnv",
           "ReasoningGymEnv", "SkyRLGymEnv", "reasoning_gym_examples", "reasoning_gym_score"]

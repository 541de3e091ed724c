"""paperloop.rl: reinforcement learning for language models (the GRPO family).

    from paperloop.rl import RLTrainer, RLConfig                        # the trainer (also `from paperloop`)
    from paperloop.rl import group_advantages, policy_loss, pass_at_k   # the math: pure functions
    from paperloop.rl import register_policy_loss                       # a paper's own loss, by name

- `advantages.py`: group advantages, one registered function per normalization (`group_std`, `batch_std`, `none`)
- `losses.py`: aggregations (`sequence_mean`, `token_mean`, `constant`) and policy losses (`ppo_clip`, `gspo`,
  `cispo`, `sapo`), registered by name, and `policy_loss`, which combines them with the KL penalty and the entropy
  bonus and reports metrics
- `metrics.py`: pass@k
- `rollouts.py`: sampled completions (or played episodes) with their rewards, and the training batch built from them
- `envs.py`: multi-turn environments (`Env`, `StepResult`, also `paperloop.envs`) and `play`, which runs episodes
- `tools.py`: `ToolEnv`, tool use as an environment (Python functions called from the action, with time limits)
- `trainer.py`: `RLTrainer` and `RLConfig`
"""

from .advantages import (ADVANTAGE_NORMALIZERS, STD_EPS, group_advantages, group_spread, overlong_penalty,
                         register_advantage, zero_std_fraction)
from .losses import (AGGREGATIONS, POLICY_LOSSES, LossOptions, aggregation_weights, cispo, gspo, k3_kl, masked_mean,
                     policy_loss, ppo_clip, register_aggregation, register_policy_loss, sapo)
from .envs import Env, Episodes, StepResult, play
from .metrics import pass_at_k
from .tools import ToolEnv
from .rollouts import Rollouts, WholeStepsPlan, rollout_batch, split_rows
from .trainer import RLConfig, RLTrainer

__all__ = ["group_advantages", "group_spread", "overlong_penalty", "zero_std_fraction", "register_advantage", "ADVANTAGE_NORMALIZERS", "STD_EPS",
           "policy_loss", "ppo_clip", "gspo", "cispo", "sapo", "LossOptions", "aggregation_weights", "k3_kl", "masked_mean", "register_aggregation",
           "register_policy_loss", "AGGREGATIONS", "POLICY_LOSSES", "pass_at_k", "Rollouts", "WholeStepsPlan",
           "rollout_batch", "split_rows", "RLConfig", "RLTrainer", "Env", "StepResult", "Episodes", "play", "ToolEnv"]

"""paperloop.envs: multi-turn environments for RLTrainer — the same names as `paperloop.rl.envs` and
`paperloop.rl.tools`, where they live (the rl room), under the short name a user imports:

    from paperloop.envs import Env, StepResult, ToolEnv
"""

from .rl.envs import Env, StepResult  # noqa: F401  (the public alias; test_layout allows this one)

__all__ = ["Env", "StepResult"]

"""paperloop.envs: multi-turn environments for RLTrainer — the same names as `paperloop.rl.envs` and
`paperloop.rl.tools`, where they live (the rl room), under the short name a user imports:

    from paperloop.envs import Env, StepResult, ToolEnv
"""

from .rl.envs import Env, StepResult  # noqa: F401  (the public alias; test_layout allows this one)
from .rl.tools import ToolEnv, parse_json_calls, parse_tag_calls, run_tool  # noqa: F401

__all__ = ["Env", "StepResult", "ToolEnv", "parse_tag_calls", "parse_json_calls", "run_tool"]

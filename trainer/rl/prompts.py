"""Where rollouts come from: a prompt scored by reward functions is a one-turn environment (`PromptEnv`, the shape
of the Tinker cookbook's `ProblemEnv`), so single-turn RL plays episodes like any multi-turn environment; and the
checks of what RLTrainer is given (prompts, reward functions, an environment factory) before anything is built.

    env = PromptEnv(example, name="train example 3", score=scorer)   # reset: the prompt; step: the rewards
"""

from __future__ import annotations

import copy
import functools
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Callable

import torch

from ..config import ConfigError
from ..lm.base import NotAScore, ScorerRaised, call_scorer
from ..lm.data import check_messages, prompt_ids
from ..plans import check_dataset
from .envs import Env, Episodes, StepResult

RewardFn = Callable[[object, str, Mapping], float]


class PromptSource:
    """Prompts scored by reward functions: each episode a `PromptEnv`; the reward's parts each function's value
    (batched functions filled in once per rollout batch). Module-level and picklable, like `EnvSource`: an async
    run sends its source to the generation process."""

    factory = None

    def __init__(self, scorer: "Scorer"):
        self.scorer, self.names, self.weights_F = scorer, scorer.names, scorer.weights_F

    def make(self, example: Mapping, name: str) -> "PromptEnv":
        return PromptEnv(example, name, self.scorer)

    def parts(self, envs: list, episodes: Episodes) -> torch.Tensor:
        return self.scorer.score_batched(envs)

    def longest(self, data, tokenizer, name: str, split: bool = False) -> int:
        return longest_prompt(data, tokenizer, name, split)


class EnvSource:
    """A user's environments, `factory(example) -> Env`: the episode's return is the reward's one part, "env"."""

    def __init__(self, factory: Callable):
        self.factory, self.names, self.weights_F = factory, ["env"], torch.ones(1, dtype=torch.float64)

    def make(self, example: Mapping, name: str) -> Env:
        return self.factory(example)

    def parts(self, envs: list, episodes: Episodes) -> torch.Tensor:
        return episodes.returns_N[:, None]

    def longest(self, data, tokenizer, name: str, split: bool = False) -> int:
        return 0  # a first observation exists only once an episode is reset: checked then


Source = PromptSource | EnvSource  # where a run's episodes come from: `make(example, name)` builds an episode's
#   environment; `names`, `weights_F` the reward's parts and their weights; `parts(envs, episodes)` reads each
#   episode's parts, (N, F) float64; `longest(data, ...)` checks a dataset up front where it can and returns the most
#   tokens a first observation takes (0: known only at reset); `factory` a user's factory (fingerprinted) or None


def rollout_source(config, env=None, reward_fns: Sequence[RewardFn] = (),
                   reward_weights: Sequence[float] | None = None, teacher: bool = False) -> Source:
    """Prompts scored by `reward_fns` (each episode a `PromptEnv`, its parts each function's value; none at all with
    a `teacher`: pure distillation), or a user's environments (`env(example) -> Env`; the episode's return is its one
    part, "env"): checked against the rest of what the trainer was given, chosen once when the trainer is built."""
    if env is None:
        if config.max_turns != 1:
            raise ConfigError(f"max_turns: a prompt's completion is one turn; max_turns={config.max_turns} needs an "
                              "environment (RLTrainer(env=...))")
        return PromptSource(Scorer(reward_fns, reward_weights, allow_none=teacher))
    if not callable(env):
        raise TypeError(f"env: a callable example -> Env (an Env subclass works), got {type(env).__name__}")
    if list(reward_fns) or reward_weights is not None:
        raise ValueError("reward_fns: with env, an episode's reward is the sum of its steps' rewards; give no "
                         "reward_fns (score the final answer in the environment's step)")
    return EnvSource(env)


class PromptEnv(Env):
    """One prompt of `train_data` or `val_data` as a one-turn episode: `reset` gives its "prompt" (text) or
    "messages" (a chat, rendered with the generation prompt), `step` scores the completion with every reward
    function (`Scorer`) and ends the episode. Its reward is the weighted total; each function's value stays in
    `rewards_F`, read by the trainer for `reward/<function>` and the rollout records."""

    def __init__(self, example: Mapping, name: str, scorer: Scorer):
        self.example, self.name, self.scorer = example, name, scorer
        self.rewards_F: list[float] = []

    def reset(self, seed: int) -> str | list[dict]:
        return self.example[check_prompt(self.example, self.name)]

    def step(self, action: str) -> StepResult:
        self.completion = action
        self.rewards_F = self.scorer(self.example, action, self.name)  # a batched function's value comes later
        return StepResult(reward=sum(w * r for w, r in zip(self.scorer.weights, self.rewards_F) if r is not None),
                          done=True)


class Scorer:
    """The reward functions of a run, their unique metric names and their weights (`weights_F`, float64), checked
    when built; called on one completion, each function's value (a ValueError or RuntimeError names the function
    and the example). A function marked `batched = True` (a reward model: `preference.RewardModelScorer`) is called
    once for a whole rollout batch instead, `fn(prompts, completions, examples) -> values` (`score_batched`): None
    stands in its place until then."""

    def __init__(self, reward_fns: Sequence[RewardFn], reward_weights: Sequence[float] | None = None,
                 allow_none: bool = False):
        fns = list(reward_fns)
        if (not fns and not allow_none) or not all(callable(fn) for fn in fns):
            raise ValueError("reward_fns: give a non-empty list of functions fn(prompt, completion, example) -> float "
                             "(none only with a teacher: pure distillation)")
        names = [getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", type(fn).__name__)
                 for fn in fns]
        weights = [1.0] * len(fns) if reward_weights is None else list(reward_weights)
        if len(weights) != len(fns) or not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights: one finite number per reward function ({len(fns)}), got "
                             f"{reward_weights!r}")
        self.fns, self.weights = fns, [float(w) for w in weights]
        self.names = [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]

    def __call__(self, example: Mapping, completion: str, name: str) -> list[float]:
        prompt = example.get("prompt", example.get("messages"))
        where = f"{name} (prompt {prompt!r:.80}, completion {completion!r:.80})"
        # Copies: a reward function that edits what it is given must not edit train_data (a resumed run, which reads
        # the data afresh, would then score other examples) nor the next function's view.
        return [None if getattr(fn, "batched", False) else
                call_scorer(fn, copy.deepcopy(prompt), completion, copy.deepcopy(example),
                            name=f"reward function {fn_name!r}", where=where)
                for fn, fn_name in zip(self.fns, self.names)]

    def score_batched(self, envs: list["PromptEnv"]) -> torch.Tensor:
        """(N, F) float64: every episode's values, the batched functions' filled in by one call each over all
        `envs` (their examples, completions and names)."""
        rewards_N_F = [list(env.rewards_F) for env in envs]
        for f, (fn, fn_name) in enumerate(zip(self.fns, self.names)):
            if not getattr(fn, "batched", False) or not envs:
                continue
            examples = [copy.deepcopy(env.example) for env in envs]
            where = f"a batch of {len(envs)} completions ({envs[0].name}, ...)"
            try:
                values = list(fn([example.get("prompt", example.get("messages")) for example in examples],
                                 [env.completion for env in envs], examples))
            except Exception as e:
                raise ScorerRaised(f"reward function {fn_name!r} raised {type(e).__name__} on {where}: {e}") from e
            if len(values) != len(envs):
                raise NotAScore(f"reward function {fn_name!r} (batched) returned {len(values)} values for {where}")
            for n, (env, value) in enumerate(zip(envs, values)):
                rewards_N_F[n][f] = call_scorer(lambda: value, name=f"reward function {fn_name!r}", where=env.name)
        return torch.tensor(rewards_N_F, dtype=torch.float64).reshape(len(envs), len(self.fns))

    @property
    def weights_F(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float64)


def check_prompt(example, name: str) -> str:
    """Which shape an RL prompt has, "prompt" or "messages"; anything else is an error naming the example."""
    if isinstance(example, Mapping) and isinstance(example.get("prompt"), str) and example["prompt"]:
        return "prompt"
    if isinstance(example, Mapping) and isinstance(example.get("messages"), list) and example["messages"]:
        check_messages(example["messages"], name)
        return "messages"
    found = sorted(example) if isinstance(example, Mapping) else type(example).__name__
    raise ValueError(f"{name}: an RL prompt is a dict with a non-empty 'prompt' string or 'messages' list; got {found}")


def longest_prompt(data, tokenizer, name: str, split_special_tokens: bool = False) -> int:
    """The most tokens a prompt of `data` (a map-style dataset, or None) takes; every prompt is checked (its shape,
    that it tokenizes to something), so a bad one is an error naming it when the trainer is built, not at the step
    that first samples it."""
    longest = 0
    for i in range(check_dataset(name, data) if data is not None else 0):
        example, where = data[i], f"{name} example {i}"
        ids = prompt_ids(example[check_prompt(example, where)], tokenizer, split_special_tokens, where=where)
        if not ids:
            raise ValueError(f"{where}: its prompt tokenizes to no tokens at all, so there is nothing to continue")
        longest = max(longest, len(ids))
    return longest


def env_factory_name(env) -> str:
    """The factory's module and name, for people (an error building an environment names it)."""
    target = getattr(env, "func", env)  # functools.partial
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"


def describe_factory(env) -> str:
    """What decides a run's episodes, as a resume compares it: the factory's name and, for a `functools.partial`
    (`ToolEnv.factory(...)` is one), every argument it binds — tools and reward functions by module and name (their
    code is not seen, as for reward functions), settings by value (call format, time limit, limits)."""
    if isinstance(env, functools.partial):
        bound = [describe_value(a) for a in env.args] + [f"{k}={describe_value(v)}" for k, v in sorted(env.keywords.items())]
        return f"{describe_factory(env.func)}({', '.join(bound)})"
    return env_factory_name(env)


def describe_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in sorted(value.items(), key=repr)) + "}"
    if callable(value):
        return describe_factory(value)
    return json.dumps(value, sort_keys=True, default=jsonable)


def example_json(example) -> bytes:
    """An example's content (metadata included) as canonical JSON: what fingerprints train_data, and what seeds a
    validation example's episodes (`digest` of it)."""
    return json.dumps(example, sort_keys=True, default=jsonable).encode()


def jsonable(value):
    """A metadata value JSON cannot write, by its content: arrays and tensors as lists, sets sorted, bytes in hex,
    other objects by their repr (a Fraction, a Path, a date) — unless the repr holds a memory address, which would
    differ in every process: then by type alone."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(json.dumps(item, sort_keys=True, default=jsonable) for item in value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    text = repr(value)
    if re.search(r" at 0x[0-9a-fA-F]+", text):
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return f"<{type(value).__qualname__}> {text}"

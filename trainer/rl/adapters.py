"""Tasks and environments written outside paperloop, played by RLTrainer as its own: reasoning-gym's tasks as prompts
scored by the task's own scorer (or as one-turn environments), and skyrl-gym's text environments as `Env`s.
Neither library's code is copied: they are imported when used (`pip install reasoning-gym skyrl-gym`).

    from paperloop.rl import ReasoningGymEnv, SkyRLGymEnv, reasoning_gym_examples, reasoning_gym_score

    data = reasoning_gym_examples("gcd", size=256, seed=0, max_value=50)     # the task's own generator, seeded
    RLTrainer(model, config, tokenizer=tok, train_data=data, reward_fns=[reasoning_gym_score])
    RLTrainer(model, config, tokenizer=tok, train_data=data, env=ReasoningGymEnv)          # the same, as episodes

    rows = [{"prompt": [{"role": "user", "content": "..."}], "reward_spec": {"ground_truth": "42"}}, ...]
    RLTrainer(model, RLConfig(max_turns=5, ...), tokenizer=tok, train_data=rows,
              env=SkyRLGymEnv.factory("gsm8k_multi_turn"))                  # SkyRL's dataset rows, its environment

An episode stays a pure function of (example, seed, actions), as RLTrainer needs for an exact resume: a reasoning-gym
example holds its task's entry (question, answer, metadata), drawn once from the task's seeded generator, and is
scored by the task's `score_answer`; a skyrl-gym environment is built afresh for each episode from the example (its
`extras`: reward_spec, extra_info, ...) and stepped by its own `step`.
"""

from __future__ import annotations

import functools
import json
import numbers
from collections.abc import Mapping

from .envs import Env, StepResult

REASONING_GYM = "reasoning_gym"  # an example's key for what reasoning-gym knows of it: task, config, entry


# ---- reasoning-gym --------------------------------------------------------------------------------------------------

def reasoning_gym_examples(task: str, size: int, seed: int, *, chat: bool = False, instruction: str = "",
                           **task_config) -> list[dict]:
    """`size` examples of the reasoning-gym task `task` (any name `reasoning_gym.create_dataset` knows; `task_config`
    its config's fields, e.g. max_value=50), drawn by the task's generator from `seed`. Each is {"prompt": the
    question (after `instruction`), "answer": the task's answer, "reasoning_gym": {"task", "config", "entry"}}, or with
    `chat=True` {"messages": [{"role": "user", "content": ...}], ...}. The entry is what the task's scorer reads."""
    dataset = _dataset(task, json.dumps(task_config, sort_keys=True), size=size, seed=seed)
    examples = []
    for i in range(size):
        entry = dataset[i]
        text = instruction + entry["question"]
        prompt = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        examples.append({**prompt, "answer": entry["answer"],
                         REASONING_GYM: {"task": task, "config": task_config, "entry": entry}})
    return examples


def reasoning_gym_score(prompt, completion: str, example: Mapping) -> float:
    """A reward function: the completion (stripped of surrounding whitespace) scored by the example's task's own
    `score_answer` (1.0 right; some tasks give partial credit), for an example from `reasoning_gym_examples`."""
    source = example.get(REASONING_GYM) if isinstance(example, Mapping) else None
    if not isinstance(source, Mapping) or not {"task", "config", "entry"} <= set(source):
        raise ValueError(f"reasoning_gym_score: the example has no {REASONING_GYM!r} entry with task, config and entry "
                         "(make examples with reasoning_gym_examples)")
    dataset = _dataset(source["task"], json.dumps(source["config"], sort_keys=True))
    score = dataset.score_answer(completion.strip(), source["entry"])
    return float(score)


class ReasoningGymEnv(Env):
    """A reasoning-gym example (from `reasoning_gym_examples`) as a one-turn episode: `reset` gives its prompt (or
    chat messages), `step` scores the action with the task's scorer and ends the episode; `env/correct` is 1 for a
    full score. RLTrainer(env=ReasoningGymEnv)."""

    def __init__(self, example: Mapping):
        self.example = example

    def reset(self, seed: int) -> str | list[dict]:
        return self.example["messages"] if "messages" in self.example else self.example["prompt"]

    def step(self, action: str) -> StepResult:
        score = reasoning_gym_score(None, action, self.example)
        return StepResult(reward=score, done=True, metrics={"correct": float(score == 1.0)})


@functools.lru_cache(maxsize=64)
def _dataset(task: str, config_json: str, size: int = 1, seed: int = 0):
    """The task's dataset (its generator and scorer), one per (task, config, size, seed) in a process."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("reasoning-gym is not installed: pip install reasoning-gym") from None
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **json.loads(config_json))
    except (ValueError, TypeError) as e:
        raise ValueError(f"reasoning-gym task {task!r} with config {config_json}: {e}") from None


# ---- skyrl-gym ------------------------------------------------------------------------------------------------------

class SkyRLGymEnv(Env):
    """A skyrl-gym text environment (`env_id`, e.g. "gsm8k", "gsm8k_multi_turn") for one example: a row of SkyRL's
    dataset format, {"prompt": chat messages, "reward_spec": {...}, "extra_info": {...}, ...}; every key but "prompt"
    is handed to the environment as its `extras`. `reset` builds the environment (`skyrl_gym.make`) and returns what
    its `init` makes of the prompt; `step` returns its reward, whether it is done, its observation messages (the next
    user turn) and its numeric metadata as `env/<key>`. skyrl-gym's text environments draw nothing at random: the seed
    is not used. Give RLTrainer `env=SkyRLGymEnv.factory(env_id, env_config)`."""

    def __init__(self, example: Mapping, env_id: str, env_config: Mapping | None = None):
        if not isinstance(example, Mapping) or not isinstance(example.get("prompt"), list):
            raise ValueError(f"SkyRLGymEnv({env_id!r}): an example is a SkyRL dataset row whose 'prompt' is a list of "
                             f"chat messages, got {type(example).__name__} "
                             f"{sorted(example) if isinstance(example, Mapping) else ''}")
        self.example, self.env_id, self.env_config = example, env_id, env_config
        self.env = None

    @classmethod
    def factory(cls, env_id: str, env_config: Mapping | None = None) -> functools.partial:
        """RLTrainer's `env`: example -> SkyRLGymEnv (a partial, so a resume compares the environment it names)."""
        return functools.partial(cls, env_id=env_id, env_config=None if env_config is None else dict(env_config))

    def reset(self, seed: int) -> list[dict]:
        try:
            import skyrl_gym
        except ImportError:
            raise ImportError("skyrl-gym is not installed: pip install skyrl-gym") from None
        extras = {key: value for key, value in self.example.items() if key != "prompt"}
        self.env = skyrl_gym.make(self.env_id, env_config=self.env_config, extras=extras)
        observation, _ = self.env.init([dict(message) for message in self.example["prompt"]])
        return observation

    def step(self, action: str) -> StepResult:
        out = self.env.step(action)
        metadata = out.get("metadata") or {}
        metrics = {key: float(value) for key, value in metadata.items()
                   if isinstance(value, numbers.Real) and not isinstance(value, bool)}
        return StepResult(reward=float(out["reward"]), done=bool(out["done"]),
                          observation=list(out["observations"] or []), metrics=metrics)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()

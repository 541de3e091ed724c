"""Environments that misbehave in ways that used to pass silently, end the process, or surface as a raw error from
deep inside: each is named (the environment's class, the example, the turn) or handled."""

import functools
import logging
import random

import pytest

from paperloop.callbacks import LambdaCallback
from paperloop.envs import Env, StepResult

from tests.support.rl import Retry, make_rl_trainer
from tests.rl.test_envs import Faulty


def test_an_observation_that_would_pass_the_context_truncates_its_episode_and_the_run_goes_on(tmp_path, caplog):
    outputs = []
    trainer = make_rl_trainer(tmp_path, env=functools.partial(Faulty, fault="huge"), max_turns=3, max_steps=1,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    with caplog.at_level(logging.WARNING, logger="paperloop.rl.envs"):
        trainer.fit()
    assert trainer.state.global_step == 1
    records = outputs[0]["records/rollouts"]
    # every episode still going at its second step got the huge observation: cut there, after 2 actions
    assert all(r["turns"] <= 2 for r in records) and any(r["turns"] == 2 and r["truncated"] for r in records)
    assert "truncated" in caplog.text and "max_position_embeddings=512" in caplog.text


class HugePrompt(Env):
    def __init__(self, example):
        pass

    def reset(self, seed):
        return "1" * 600

    def step(self, action):
        return StepResult(done=True)


def test_a_first_observation_past_the_context_is_still_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"environment HugePrompt on train example \d+: first observation is"):
        make_rl_trainer(tmp_path, env=HugePrompt, max_steps=1).fit()


class Strange(Retry):
    """Retry, with one misbehaviour at its second step (or in close)."""

    closed = []

    def __init__(self, example, fault):
        super().__init__(example)
        self.fault = fault

    def step(self, action):
        result = super().step(action)
        if self.fault == "huge reward":  # each step's reward within float32's range, their sum not
            return StepResult(reward=3e38, observation="1=")
        if len(self.record["actions"]) < 2:
            return result
        if self.fault == "surrogate":
            return StepResult(observation="file_\udcff=")
        if self.fault == "surrogate in a message":
            return StepResult(observation=[{"role": "user", "content": "\ud800"}])
        if self.fault == "exit":
            raise SystemExit(0)
        if self.fault == "step and close":
            raise KeyError("step failed")
        return result

    def close(self):
        Strange.closed.append(self)
        if self.fault in ("close", "step and close"):
            raise OSError("close failed")


@pytest.mark.parametrize("fault, error, message", [
    ("surrogate", ValueError, r"Strange on train example \d+, turn 2: the observation: holds '\\udcff'"),
    ("exit", RuntimeError, r"Strange on train example \d+, turn 2: step raised SystemExit"),
    ("huge reward", ValueError, r"Strange on train example \d+: the episode's rewards sum to .*beyond float32"),
    ("close", RuntimeError, r"Strange on train example \d+: close raised OSError: close failed"),
    ("step and close", RuntimeError, r"turn 2: step raised KeyError"),
])
def test_what_an_environment_does_wrong_is_named_and_every_environment_is_closed(tmp_path, fault, error, message):
    Strange.closed = []
    trainer = make_rl_trainer(tmp_path, env=functools.partial(Strange, fault=fault), max_turns=3, max_steps=1)
    with pytest.raises(error, match=message):
        trainer.fit()
    assert len(Strange.closed) == 16  # all of the step's episodes: 4 examples x 4


def test_a_chat_observation_that_is_not_valid_unicode_is_named(tmp_path):
    class ChatStrange(Strange):
        def reset(self, seed):
            super().reset(seed)
            return [{"role": "user", "content": self.example["prompt"]}]

        def step(self, action):
            return StepResult(observation=[{"role": "user", "content": "\ud800"}])

    trainer = make_rl_trainer(tmp_path, env=functools.partial(ChatStrange, fault="surrogate in a message"),
                              max_turns=3, max_steps=1)
    with pytest.raises(ValueError, match=r"turn 1: an observation message's content: holds '\\ud800'"):
        trainer.fit()


class Counting(Retry):
    """Keeps a count across episodes, on the class: a resumed run would restart it and see other episodes."""

    episodes = 0

    def reset(self, seed):
        super().reset(seed)
        Counting.episodes += 1
        return f"{Counting.episodes % 10}+1="


class Unseeded(Retry):
    def reset(self, seed):
        super().reset(seed)
        return f"{random.randrange(10)}+{random.randrange(10)}="


@pytest.mark.parametrize("env", [Counting, Unseeded])
def test_an_environment_that_is_not_a_pure_function_of_its_seed_is_refused_at_the_first_step(tmp_path, env):
    with pytest.raises(ValueError, match=rf"environment {env.__name__} on train example \d+: reset with the same seed "
                                         "gave another first observation"):
        make_rl_trainer(tmp_path, env=env, max_turns=2, max_steps=1).fit()


def test_a_pure_environment_is_reset_once_more_per_fit_and_trains(tmp_path):
    Retry.log = []
    try:
        make_rl_trainer(tmp_path, env=Retry, max_turns=2, max_steps=2).fit()
        resets = list(Retry.log)
    finally:
        Retry.log = None
    assert len(resets) == 2 * 16 + 1  # two steps' episodes, and the one replayed at the first step


def add(a: int, b: int) -> int:
    return a + b


def sub(a: int, b: int) -> int:
    return a - b


def exact(example, answer):
    return float(answer == example["answer"])


def digits(example, answer):
    return float(answer[:1] == example["answer"][:1])


def test_a_resume_with_another_tool_environment_is_refused_naming_the_environment(tmp_path):
    """The fingerprint was the factory's name, ToolEnv.factory's alike for any tools, reward or limits."""
    from paperloop import CheckpointError
    from paperloop.envs import ToolEnv

    run = dict(max_turns=2, max_steps=4, checkpoint_every_steps=2)
    stop = LambdaCallback(on_batch_end=lambda t, o: t.state.global_step == 2 and t.request_stop("x", resumable=True))
    make_rl_trainer(tmp_path, env=ToolEnv.factory([add], exact, max_calls=2), callbacks=[stop], **run).fit()
    for other in (ToolEnv.factory([sub], exact, max_calls=2), ToolEnv.factory([add], digits, max_calls=2),
                  ToolEnv.factory([add], exact, max_calls=3), ToolEnv.factory([add], exact, max_calls=2,
                                                                            call_format="json")):
        with pytest.raises(CheckpointError, match="env: is not the one the checkpointed run used"):
            make_rl_trainer(tmp_path, env=other, **run).fit(resume="latest")
    resumed = make_rl_trainer(tmp_path, env=ToolEnv.factory([add], exact, max_calls=2), **run)
    resumed.fit(resume="latest")
    assert resumed.state.global_step == 4

"""ToolEnv: calls read from an action without running code, tools that raise, hang or return too much answered
with an error the policy reads (never a crash), the final answer scored, and a training run through RLTrainer."""

import sys
import threading
import time

import pytest

from paperloop.callbacks import LambdaCallback
from paperloop.envs import ToolEnv, parse_json_calls, parse_tag_calls, run_tool
from paperloop.rl.tools import ToolCallError

from tests.support.rl import make_rl_trainer


def mul(a, b):
    return a * b


def test_tag_calls_are_read_as_literals_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    calls = parse_tag_calls(f"x<call>mul(12, b=34)</call> and <call>mul(-1, 2.5)</call><call>open({str(marker)!r}, 'w')"
                            f".write('x')</call><call>__import__('os').system('touch {marker}')</call>"
                            "<call>mul(a)</call><call>mul(1 +</call>")
    assert calls[0] == ("mul", (12,), {"b": 34}) and calls[1] == ("mul", (-1, 2.5), {})
    assert isinstance(calls[2], ToolCallError) and "not a call of a tool by its name" in str(calls[2])
    assert isinstance(calls[3], ToolCallError) and isinstance(calls[5], ToolCallError)
    assert isinstance(calls[4], ToolCallError)  # a name is no literal
    assert not marker.exists()
    assert parse_tag_calls("408") == []


def test_json_calls_in_the_qwen_hermes_format():
    calls = parse_json_calls('<tool_call>{"name": "mul", "arguments": {"a": 2, "b": 3}}</tool_call>'
                             '<tool_call>{"name": 1}</tool_call><tool_call>{oops</tool_call>')
    assert calls[0] == ("mul", (), {"a": 2, "b": 3})
    assert all(isinstance(c, ToolCallError) for c in calls[1:])


def boom():
    raise ZeroDivisionError("no")


def spin():
    while True:
        pass


def sleepy():
    time.sleep(60)


def exits():
    sys.exit(3)


def huge():
    return "7" * 10_000


@pytest.mark.parametrize("fn, expected", [
    (boom, "error: ZeroDivisionError: no"),
    (spin, "error: timed out after 0.2 s"),
    (sleepy, "error: timed out after 0.2 s"),
    (exits, "error: SystemExit: 3"),
    (lambda: 10 ** 5000, "error: ValueError: Exceeds the limit"),  # str() of the result fails: an error too
])
def test_a_tool_that_raises_hangs_or_exits_answers_with_an_error(fn, expected):
    text, failed = run_tool(fn, (), {}, timeout_s=0.2, max_chars=100)
    assert failed and text.startswith(expected)


def test_a_huge_result_is_cut_and_a_hang_off_the_main_thread_is_abandoned():
    text, failed = run_tool(huge, (), {}, timeout_s=1.0, max_chars=50)
    assert not failed and text == "7" * 50 + "... [9950 more characters cut]"
    released, out = threading.Event(), {}

    def stuck():  # spins until the test lets it go: an abandoned spinning thread would slow every later test
        while not released.is_set():
            pass

    worker = threading.Thread(target=lambda: out.update(r=run_tool(stuck, (), {}, timeout_s=0.2, max_chars=50)))
    worker.start()
    worker.join(30)
    released.set()
    assert out["r"] == ("error: timed out after 0.2 s", True)


def test_an_episode_runs_calls_until_an_answer_and_scores_it():
    env = ToolEnv({"prompt": "12*34=", "answer": "408"}, tools=[mul, boom],
                  reward=lambda example, answer: float(answer == example["answer"]), max_calls=2)
    assert env.reset(0) == "12*34="
    step = env.step("<call>mul(12, 34)</call>")
    assert (step.observation, step.done, step.reward) == ("<result>408</result>", False, 0.0)
    step = env.step("<call>boom()</call><call>nope(1)</call><call>mul(1, 1)</call>")
    # a call beyond max_calls adds nothing (issue 26: a policy writing thousands of calls must not grow the
    # observation past the context), and counts as an error
    assert step.observation == ("<result>error: ZeroDivisionError: no</result><result>error: no tool named 'nope' "
                                "(tools: boom, mul)</result>")
    assert step.metrics == {"tool_calls": 3.0, "tool_errors": 3.0}
    step = env.step("408")
    assert step.done and step.reward == 1.0 and step.metrics["used_tools"] == 1.0


def test_chat_episodes_get_results_as_messages():
    env = ToolEnv({"messages": [{"role": "user", "content": "2*3="}]}, tools=[mul], reward=lambda e, a: 0.0,
                  call_format="json", result_role="user")
    env.reset(0)
    step = env.step('<tool_call>{"name": "mul", "arguments": {"a": 2, "b": 3}}</tool_call>')
    assert step.observation == [{"role": "user", "content": "6"}]


def test_bad_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="distinct names"):
        ToolEnv.factory(tools=[mul, mul], reward=lambda e, a: 0.0)
    with pytest.raises(TypeError, match="tools is a list"):
        ToolEnv.factory(tools="mul", reward=lambda e, a: 0.0)
    with pytest.raises(ValueError, match="call_format"):
        ToolEnv({}, tools=[mul], reward=lambda e, a: 0.0, call_format="xml")


def fickle_calls(action):
    """A call format for an untrained policy: an action holding a 1 calls the failing tool, a 2 the hanging one,
    a 3 the huge one; anything else is the answer."""
    for digit, name in (("1", "boom"), ("2", "spin"), ("3", "huge")):
        if digit in action:
            return [(name, (), {})]
    return []


class SeenToolEnv(ToolEnv):
    seen: list = []

    def step(self, action):
        result = super().step(action)
        SeenToolEnv.seen.append(result.observation)
        return result


def test_training_survives_tools_that_raise_hang_and_flood(tmp_path):
    outputs, SeenToolEnv.seen = [], []
    env = SeenToolEnv.factory(tools=[boom, spin, huge], reward=lambda example, answer: float(answer == example["answer"]),
                              call_format=fickle_calls, timeout_s=0.05, max_result_chars=40)
    trainer = make_rl_trainer(tmp_path, env=env, max_turns=3, max_steps=2,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    assert trainer.state.global_step == 2
    assert all(o["env/tool_calls"] > 0 and o["env/tool_errors"] > 0 for o in outputs)
    seen = set(SeenToolEnv.seen)
    assert {"<result>error: ZeroDivisionError: no</result>", "<result>error: timed out after 0.05 s</result>",
            "<result>" + "7" * 40 + "... [9960 more characters cut]</result>"} <= seen

"""ToolEnv under a policy that degenerates: thousands of unclosed tags, thousands of calls, results that are not
text a tokenizer takes."""

import random
import re
import subprocess
import sys

from paperloop.envs import ToolEnv
from paperloop.rl import tools
from paperloop.rl.tools import parse_json_calls, parse_tag_calls, run_tool, tagged


def mul(a: int, b: int) -> int:
    return a * b


class Scanned(str):
    """A str that counts the characters its `find` scans (to the match, or to the end when there is none)."""

    scanned = 0

    def find(self, sub, start=0, *args):
        found = str.find(self, sub, start, *args)
        Scanned.scanned += (found if found >= 0 else len(self)) - start
        return found


def test_finding_tagged_calls_scans_the_action_a_bounded_number_of_times(monkeypatch):
    """8,000 unclosed tags took 10.5 s per action with a lazy regex (each opening tag scanned to the end: quadratic);
    the parsers find their calls with `tagged`, which scans each character at most twice."""
    for tag in ("<call>", "<tool_call>"):
        action = Scanned(tag * 8000 + "x" + "<call>mul(1, 2)</call>" * 100)
        Scanned.scanned = 0
        tagged(action, tag, tag.replace("<", "</"))
        assert Scanned.scanned <= 2 * len(action)
    seen = []
    monkeypatch.setattr(tools, "tagged", lambda action, start, end: seen.append((start, end)) or [])
    assert parse_tag_calls("<call>") == [] and parse_json_calls("<tool_call>") == []
    assert seen == [("<call>", "</call>"), ("<tool_call>", "</tool_call>")]


def test_the_texts_between_tags_are_the_lazy_regexs_on_any_mix_of_tags():
    """What a non-greedy `<call>(.*?)</call>` finds, on 2,000 random mixes of opening and closing tags and text."""
    rng = random.Random(0)
    pieces = ["<call>", "</call>", "<tool_call>", "</tool_call>", "mul(1, 2)", "x", "<", ">", "\n"]
    for _ in range(2000):
        action = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        for start, end in (("<call>", "</call>"), ("<tool_call>", "</tool_call>")):
            assert tagged(action, start, end) == re.findall(f"{start}(.*?){end}", action, re.DOTALL), action


def test_calls_beyond_max_calls_add_nothing_to_the_observation():
    env = ToolEnv({"prompt": "1*1=", "answer": "1"}, tools=[mul], reward=lambda e, a: 0.0, max_calls=2,
                  max_result_chars=20)
    env.reset(0)
    step = env.step("<call>mul(2, 3)</call>" * 5000)
    assert step.observation == "<result>6</result>" * 2
    assert step.metrics == {"tool_calls": 5000.0, "tool_errors": 4998.0}


def test_a_result_that_is_not_valid_unicode_is_escaped_not_a_tokenizer_error():
    text, failed = run_tool(lambda: "file_\udcff.txt", (), {}, 1.0, 100)
    assert not failed and text == "file_\\udcff.txt"
    text.encode("utf-8")  # what a tokenizer needs


RETRYING_TOOL = """
import time
from paperloop.rl.tools import run_tool

def stubborn():
    while True:  # a retry loop that swallows every Exception, the timeout's too if it were one
        try:
            time.sleep(10)
        except Exception:
            pass

def catch_all():
    for _ in range(3):  # even a bare except, a few times over: the limit is raised again until let through
        try:
            time.sleep(10)
        except:  # noqa: E722
            pass
    time.sleep(10)

print(run_tool(stubborn, (), {}, 0.2, 100), run_tool(catch_all, (), {}, 0.2, 100))
"""


def test_a_tools_time_limit_holds_against_a_retry_loop_that_swallows_exceptions(tmp_path):
    """The timeout was one Exception raised once: `except Exception` in a retry loop hung the run. Run in a
    subprocess so that a regression fails here (its timeout) instead of hanging the suite."""
    script = tmp_path / "retrying.py"
    script.write_text(RETRYING_TOOL)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "('error: timed out after 0.2 s', True) ('error: timed out after 0.2 s', True)"

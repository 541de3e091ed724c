"""Tool use as an environment: `ToolEnv` runs Python functions the policy calls, and scores its final answer.

    from paperloop.envs import ToolEnv

    def mul(a: int, b: int) -> int:
        return a * b

    def correct(example, answer: str) -> float:
        return float(answer.strip() == example["answer"])

    env = ToolEnv.factory(tools=[mul], reward=correct)           # example -> ToolEnv: RLTrainer(env=env)

An episode: the first observation is the example's "prompt" (text) or "messages" (chat), or what `prompt(example)`
returns. Each action is searched for tool calls; each call runs with a time limit and its result — or its error —
is the next observation. The first action without a call is the final answer: the episode ends with
`reward(example, answer)`. A tool that raises, hangs, or returns something huge never stops the run: the policy
reads an error (or a cut result), and `env/tool_errors` counts it.

Call formats (`call_format`):
- "tags" (default): `<call>name(args)</call>` with Python literal arguments, positional or by keyword —
  `<call>mul(12, 34)</call>`, `<call>search(query="x", k=3)</call>` — read with `ast.literal_eval` (no code runs);
  a result comes back as `<result>...</result>`.
- "json": `<tool_call>{"name": "mul", "arguments": {"a": 12, "b": 34}}</tool_call>`, the format Qwen2.5/Qwen3 and
  Hermes chat templates write; a result comes back as `<tool_response>...</tool_response>`.
- any callable `action -> [(name, args tuple, kwargs dict), ...]`.
In a chat episode a result is a message of role `result_role` ("tool"; "user" for templates without a tool role).

Time limits: on the main thread, SIGALRM interrupts a tool stuck in Python code or in a sleep; elsewhere the call
runs in a daemon thread that is abandoned when it overruns. Neither interrupts a C routine that never returns to
the interpreter: run untrusted code in a process of its own inside the tool.
"""

from __future__ import annotations

import ast
import functools
import json
import threading
from collections.abc import Callable, Mapping, Sequence

from ..timeouts import alarm_usable, time_limit
from .envs import Env, StepResult

__all__ = ["ToolEnv", "parse_tag_calls", "parse_json_calls", "run_tool"]

RESULT_TAGS = {"tags": ("<result>", "</result>"), "json": ("<tool_response>", "</tool_response>")}


class ToolCallError(ValueError):
    """A call the policy wrote that cannot be read: its message is what the policy sees."""


def tagged(action: str, start: str, end: str) -> list[str]:
    """The texts between `start` and the first `end` after it, left to right, in time linear in the action (a
    policy that repeats an opening tag thousands of times without closing it made a lazy regex quadratic)."""
    texts, position = [], 0
    while (opening := action.find(start, position)) >= 0:
        closing = action.find(end, opening + len(start))
        if closing < 0:  # no closing tag after this one: none after any later opening either
            break
        texts.append(action[opening + len(start):closing])
        position = closing + len(end)
    return texts


def parse_tag_calls(action: str) -> list:
    """The `<call>name(args)</call>` calls in `action`, in order: (name, args, kwargs), or a ToolCallError in the
    place of one that cannot be read."""
    calls = []
    for text in tagged(action, "<call>", "</call>"):
        try:
            node = ast.parse(text.strip(), mode="eval").body
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                raise ValueError("not a call of a tool by its name")
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
            if len(kwargs) != len(node.keywords):
                raise ValueError("** arguments are not read")
            calls.append((node.func.id, args, kwargs))
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
            calls.append(ToolCallError(f"cannot read the call {text.strip()!r:.80}: {e}"))
    return calls


def parse_json_calls(action: str) -> list:
    """The `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` calls in `action`, as `parse_tag_calls`."""
    calls = []
    for text in tagged(action, "<tool_call>", "</tool_call>"):
        try:
            call = json.loads(text)
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                    and isinstance(call.get("arguments", {}), dict)):
                raise ValueError('expected {"name": str, "arguments": {...}}')
            calls.append((call["name"], (), call.get("arguments", {})))
        except (ValueError, RecursionError) as e:
            calls.append(ToolCallError(f"cannot read the call {text.strip()!r:.80}: {e}"))
    return calls


PARSERS = {"tags": parse_tag_calls, "json": parse_json_calls}


class ToolTimeout(BaseException):
    """A tool call ran past its time limit: a BaseException, so that a tool's own `except Exception` (a retry loop,
    say) does not swallow it (`timeouts.time_limit` raises it again until the tool lets it through)."""


def run_tool(fn: Callable, args: tuple, kwargs: dict, timeout_s: float, max_chars: int) -> tuple[str, bool]:
    """`fn(*args, **kwargs)` as text for the policy, at most `max_chars` long, and whether it failed: an exception
    (or an overrun of `timeout_s`, or a result whose str() fails) becomes "error: <type>: <message>"."""
    def call() -> str:
        return str(fn(*args, **kwargs))

    try:
        text = _within(call, timeout_s)
        failed = False
    except ToolTimeout:
        text, failed = f"error: timed out after {timeout_s:g} s", True
    except (Exception, SystemExit) as e:  # a tool's sys.exit() is its error too
        text, failed = f"error: {type(e).__name__}: {e}", True
    if len(text) > max_chars:
        text = text[:max_chars] + f"... [{len(text) - max_chars} more characters cut]"
    # a lone surrogate (a non-UTF-8 file name read by os.listdir, say) is no text a tokenizer takes: escaped
    return text.encode("utf-8", "backslashreplace").decode("utf-8"), failed


def _within(fn: Callable[[], str], seconds: float) -> str:
    if alarm_usable():
        with time_limit(seconds, ToolTimeout):
            return fn()
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: B036 - handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="paperloop-tool")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ToolTimeout
    if "error" in box:
        raise box["error"]
    return box["value"]


class ToolEnv(Env):
    """One tool-use episode of `example`: see the module's docstring. `max_calls` bounds the calls run per action
    (the rest are not run, add nothing to the observation and count as errors); `max_result_chars` the length of
    each result: an observation holds at most max_calls results of max_result_chars each."""

    def __init__(self, example, tools: Sequence[Callable], reward: Callable[[object, str], float],
                 prompt: Callable | None = None, call_format: str | Callable = "tags", result_role: str = "tool",
                 timeout_s: float = 5.0, max_result_chars: int = 1000, max_calls: int = 4):
        self.example, self.reward, self.prompt = example, reward, prompt
        self.tools = check_tools(tools)
        if not callable(reward):
            raise TypeError(f"ToolEnv: reward must be a function reward(example, answer) -> float, got {reward!r:.60}")
        if not (callable(call_format) or call_format in PARSERS):
            raise ValueError(f"ToolEnv: call_format must be one of {sorted(PARSERS)} or a function, got "
                             f"{call_format!r:.60}")
        if not (0 < timeout_s < float("inf")) or max_result_chars < 1 or max_calls < 1:
            raise ValueError(f"ToolEnv: timeout_s > 0, max_result_chars >= 1 and max_calls >= 1, got {timeout_s}, "
                             f"{max_result_chars}, {max_calls}")
        self.parse = PARSERS.get(call_format, call_format)
        self.tags = RESULT_TAGS.get(call_format, RESULT_TAGS["tags"])
        self.result_role, self.timeout_s, self.max_chars, self.max_calls = result_role, timeout_s, max_result_chars, \
            max_calls
        self.chat, self.calls = False, 0

    @classmethod
    def factory(cls, tools: Sequence[Callable], reward: Callable[[object, str], float], **options) -> Callable:
        """`example -> ToolEnv(example, tools, reward, **options)`, for RLTrainer(env=...)."""
        check_tools(tools)
        return functools.partial(cls, tools=list(tools), reward=reward, **options)

    def reset(self, seed: int):
        if self.prompt is not None:
            first = self.prompt(self.example)
        elif isinstance(self.example, Mapping) and ("prompt" in self.example or "messages" in self.example):
            first = self.example.get("prompt", self.example.get("messages"))
        else:
            raise ValueError("ToolEnv: an example needs a 'prompt' or 'messages', or give ToolEnv prompt=fn(example)")
        self.chat, self.calls = isinstance(first, list), 0
        return first

    def step(self, action: str) -> StepResult:
        calls = self.parse(action)
        if not calls:  # the final answer
            reward = self.reward(self.example, action)
            return StepResult(reward=reward, done=True, metrics={"tool_calls": 0.0, "tool_errors": 0.0,
                                                                 "used_tools": float(self.calls > 0)})
        results, errors = [], 0
        for call in calls[:self.max_calls]:  # calls beyond add nothing: an observation stays bounded
            if isinstance(call, ToolCallError):
                text, failed = f"error: {call}", True
            else:
                name, args, kwargs = call
                if name not in self.tools:
                    text, failed = f"error: no tool named {name!r:.40} (tools: {', '.join(sorted(self.tools))})", True
                else:
                    text, failed = run_tool(self.tools[name], tuple(args), dict(kwargs), self.timeout_s,
                                            self.max_chars)
            results.append(text)
            errors += failed
        self.calls += len(calls)
        metrics = {"tool_calls": float(len(calls)), "tool_errors": float(errors + max(len(calls) - self.max_calls, 0))}
        if self.chat:
            return StepResult(observation=[{"role": self.result_role, "content": text} for text in results],
                              metrics=metrics)
        start, end = self.tags
        return StepResult(observation="".join(f"{start}{text}{end}" for text in results), metrics=metrics)


def check_tools(tools) -> dict[str, Callable]:
    """Tools by name (each function's __name__), or an error naming what is wrong."""
    if isinstance(tools, Mapping):
        named = dict(tools)
    elif isinstance(tools, Sequence) and not isinstance(tools, str):
        named = {getattr(fn, "__name__", None): fn for fn in tools}
        if len(named) != len(tools):
            raise ValueError(f"ToolEnv: tools need distinct names, got {[getattr(f, '__name__', f) for f in tools]}")
    else:
        raise TypeError(f"ToolEnv: tools is a list of functions (or a dict name -> function), got {type(tools).__name__}")
    for name, fn in named.items():
        if not (isinstance(name, str) and name.isidentifier() and callable(fn)):
            raise TypeError(f"ToolEnv: a tool is a function with a name that is an identifier, got {name!r}: {fn!r:.60}")
    if not named:
        raise ValueError("ToolEnv: give at least one tool")
    return named

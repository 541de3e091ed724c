"""Multi-turn environments: the `Env` interface, and the episodes a policy plays in them (`play`).

    from paperloop.envs import Env, StepResult

    class Guess(Env):
        def __init__(self, example):                  # one episode of one train example
            self.secret = example["secret"]
        def reset(self, seed: int) -> str:            # the first observation: prompt text, or chat messages
            return "Guess a digit: "
        def step(self, action: str) -> StepResult:    # the action: the decoded turn, special tokens skipped
            if action.strip() == self.secret:
                return StepResult(reward=1.0, done=True)
            return StepResult(observation=" no, again: ", metrics={"wrong": 1.0})

    trainer = RLTrainer(model, RLConfig(max_turns=4, ...), tokenizer=tok, train_data=examples, env=Guess)

An episode alternates: the policy samples an action (up to `max_new_tokens`, ending at a stop token), the
environment steps on it, and its observation is appended, until the step says `done` or `max_turns` actions were
taken (then the episode is truncated). Its reward is the sum of its steps' rewards. A text observation is tokenized
and appended as it is; in an episode that began with chat messages, an observation is a list of messages (a user
turn, a tool result), rendered by the chat template as the next turn. The transcript is one token sequence: the
policy's tokens are trained (weight 1), the environment's — observations and the template's framing — are not.

An episode is a pure function of (example, seed, actions): all of its randomness comes from `reset(seed)`, and
nothing carries over from one episode to the next (a counter on the class, a shared cache, an unseeded random
draw). The trainer derives the seed from (run seed, step, example index, generation), so a resumed run replays
the same episodes — if they are pure. `check_replay` tests it cheaply once per fit: a second environment of the
first example, reset with the same seed, must give the same first observation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..lm.base import SCORE_LIMIT, ScoreError, as_score
from ..lm.data import check_messages, check_text, prompt_ids, render_chat
from ..lm.sampling import TurnSampler
from ..rng import mixed_seed

log = logging.getLogger(__name__)

__all__ = ["Env", "StepResult", "Episodes", "play", "check_replay", "episode_seed", "env_name"]

@dataclass(frozen=True)
class StepResult:
    """What an environment answers to an action: its reward, whether the episode is over, the next observation
    (text, or chat messages in a chat episode; ignored when done) and numbers to log as `env/<key>`."""

    reward: float = 0.0
    done: bool = False
    observation: str | list = ""
    metrics: Mapping = field(default_factory=dict)


class Env:
    """One episode. Subclass it, or give RLTrainer any callable `example -> object` with these methods."""

    def reset(self, seed: int) -> str | list[dict]:
        """The first observation: a prompt (text, tokenized with the tokenizer's special tokens, e.g. BOS) or chat
        messages (rendered with the generation prompt). Draw any randomness from `seed` alone: `random.Random(seed)`,
        `np.random.default_rng(seed)` (a seed below 2**63; numpy's legacy `np.random.seed` takes 32 bits only)."""
        raise NotImplementedError(f"{type(self).__name__} has no reset(self, seed)")

    def step(self, action: str) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__} has no step(self, action)")

    def close(self) -> None:
        """Called once the episode is over (done, truncated, or stopped by an error)."""


def env_name(env) -> str:
    return type(env).__qualname__


def episode_seed(seed: int, step: int, index: int, generation: int) -> int:
    """The seed of an episode's `reset`: one per (run seed, loop step, example index, generation)."""
    return mixed_seed(seed, step, index, generation, 0xE1B)


@dataclass(frozen=True)
class Episodes:
    """N played episodes, G consecutive per example, as right-padded (N, T) tensors on the CPU:

    tokens_N_T: each transcript's ids — the first observation, then each action and observation in turn — padded
        with `pad_id` after its `lengths_N` tokens.
    policy_N_T: True where the policy sampled the token, False where the environment (or the template) put it.
    logprobs_N_T: the sampler's log-prob of each policy token, 0 elsewhere (float32; float64 for a float64 model).
    first_lengths_N: the first observation's length. turns_N: actions taken. done_N: ended by the environment
    (False: truncated at max_turns). last_stopped_N: the last action ended at a stop token (False: it ran out of
    max_new_tokens). returns_N: the sum of the step rewards (float64). rewards_N_F: the reward in parts, float64
    (here the return alone, F = 1; a prompt's one-turn episode: each reward function's value, `rl.prompts`).
    first_N: the first observations as `reset` returned them. metrics: key -> (sum, count) of the steps' `metrics`
    over every episode. env_s: seconds spent in the environments (reset, step, close).
    """

    tokens_N_T: torch.Tensor
    policy_N_T: torch.Tensor
    logprobs_N_T: torch.Tensor
    lengths_N: torch.Tensor
    first_lengths_N: torch.Tensor
    turns_N: torch.Tensor
    done_N: torch.Tensor
    last_stopped_N: torch.Tensor
    returns_N: torch.Tensor
    rewards_N_F: torch.Tensor
    first_N: list
    metrics: dict
    group_size: int
    pad_id: int
    env_s: float = 0.0

    def __len__(self) -> int:
        return len(self.lengths_N)

    @property
    def policy_tokens_N(self) -> torch.Tensor:
        return self.policy_N_T.sum(dim=1)

    @property
    def stopped_N(self) -> torch.Tensor:
        """(N,) bool: the episode ended as the environment and the policy meant it to — done, its last action at a
        stop token — and was not cut by a budget (max_turns, max_new_tokens)."""
        return self.done_N & self.last_stopped_N

    @property
    def env_tokens_N(self) -> torch.Tensor:
        """(N,) tokens after the first observation that the environment (or the template) put there."""
        return self.lengths_N - self.first_lengths_N - self.policy_tokens_N

    def transcripts(self) -> list[list[int]]:
        """Each transcript's ids, unpadded (one host transfer)."""
        return [row[:n] for row, n in zip(self.tokens_N_T.tolist(), self.lengths_N.tolist())]

    def take(self, rows: Sequence[int]) -> "Episodes":
        """The episodes at `rows`, in that order, cut to their longest (their metrics and time stay the whole set's)."""
        index_K = torch.tensor(list(rows), dtype=torch.long)
        width = int(self.lengths_N[index_K].max()) if len(index_K) else 0
        return dataclasses.replace(self, **{name: getattr(self, name)[index_K, :width] for name in PER_TOKEN},
                                   **{name: getattr(self, name)[index_K] for name in PER_EPISODE},
                                   first_N=[self.first_N[r] for r in rows])

    @staticmethod
    def from_lists(tokens_N: list[list[int]], policy_N: list[list[bool]], logprobs_N: list[list[float]],
                   first_lengths_N: list[int], turns_N: list[int], done_N: list[bool], last_stopped_N: list[bool],
                   returns_N: list[float], first_N: list, *, metrics: dict, group_size: int, pad_id: int,
                   env_s: float = 0.0, logprob_dtype: torch.dtype = torch.float32) -> "Episodes":
        """Episodes from one python list per episode and field (what `play` builds turn by turn), padded into one
        tensor per field at once (a tensor op per row would cost more); the reward's one part is the return."""
        lengths_N = [len(tokens) for tokens in tokens_N]
        width = max(lengths_N)

        def padded(rows, value, dtype):
            return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=dtype)

        returns = torch.tensor(returns_N, dtype=torch.float64)
        return Episodes(padded(tokens_N, pad_id, torch.long), padded(policy_N, False, torch.bool),
                        padded(logprobs_N, 0.0, logprob_dtype), torch.tensor(lengths_N), torch.tensor(first_lengths_N),
                        torch.tensor(turns_N), torch.tensor(done_N, dtype=torch.bool),
                        torch.tensor(last_stopped_N, dtype=torch.bool), returns, returns[:, None].clone(), list(first_N),
                        metrics, group_size, pad_id, env_s)

    @staticmethod
    def concat(parts: Sequence["Episodes"]) -> "Episodes":
        """Several sets' episodes in order, padded to the widest; their metrics and times summed."""
        width = max(part.tokens_N_T.shape[1] for part in parts)
        pad = {"tokens_N_T": parts[0].pad_id, "policy_N_T": False, "logprobs_N_T": 0.0}
        metrics: dict = {}
        for part in parts:
            for key, (total, count) in part.metrics.items():
                old = metrics.get(key, (0.0, 0))
                metrics[key] = (old[0] + total, old[1] + count)
        return dataclasses.replace(
            parts[0], **{name: torch.cat([F.pad(getattr(p, name), (0, width - p.tokens_N_T.shape[1]), value=value)
                                          for p in parts]) for name, value in pad.items()},
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in PER_EPISODE},
            first_N=[first for p in parts for first in p.first_N], metrics=metrics, env_s=sum(p.env_s for p in parts))


PER_TOKEN = ("tokens_N_T", "policy_N_T", "logprobs_N_T")
PER_EPISODE = ("lengths_N", "first_lengths_N", "turns_N", "done_N", "last_stopped_N", "returns_N", "rewards_N_F")


def play(model, tokenizer, envs_N: list, seeds_N: list[int], names_N: list[str], *, group_size: int, max_turns: int,
         max_new_tokens: int, generator: torch.Generator, temperature: float, top_p: float, stop_token_ids: list[int],
         pad_token_id: int, max_positions: int | None, split_special_tokens: bool = False) -> Episodes:
    """Play one episode in each of `envs_N` (seeded by `seeds_N`; `names_N` name their examples in errors): every
    live episode's action sampled in one batch, each turn continuing its KV cache (`lm.sampling.TurnSampler`).
    An observation that, with a next action of max_new_tokens, would pass the model's context (`max_positions`)
    truncates its episode (a warning says how many); a first observation that would is an error. Every environment
    is closed at the end, also when one of them fails."""
    clock, dtype = _Clock(), torch.float32
    try:
        with clock:
            first_N = [_reset(env, seed, name) for env, seed, name in zip(envs_N, seeds_N, names_N)]
        chats_N = [list(obs) if isinstance(obs, list) else None for obs in first_N]  # a chat episode's messages
        played = _Transcripts([_first_ids(obs, tokenizer, split_special_tokens, env, name)
                               for obs, env, name in zip(first_N, envs_N, names_N)])
        for n, tokens in enumerate(played.tokens_N):
            _check_room(len(tokens), max_new_tokens, max_positions, envs_N[n], names_N[n], 0, "first observation")
        sampler = TurnSampler(model, played.tokens_N, generator=generator, temperature=temperature, top_p=top_p,
                              eos_token_id=stop_token_ids, pad_token_id=pad_token_id)
        for turn in range(1, max_turns + 1):
            actions = sampler.sample(max_new_tokens)
            ids_R, stopped_R, dtype = actions.completions(), actions.stopped_N.tolist(), actions.logprobs_N_L.dtype
            texts_R = tokenizer.batch_decode(ids_R, skip_special_tokens=True)
            going, observations, overflowed = [], [], []
            for r, (n, ids, logprobs) in enumerate(zip(sampler.rows, ids_R, actions.logprobs_N_L.tolist())):
                env, name = envs_N[n], names_N[n]
                played.add(n, ids, logprobs[:len(ids)])
                with clock:
                    result = _step(env, texts_R[r], name, turn)
                played.record(n, turn, stopped_R[r], result)
                if result.done or turn == max_turns:
                    continue  # over (truncated at max_turns: no observation is needed after the last action)
                observation = _observation_ids(result.observation, chats_N[n], texts_R[r], ids[-1] if stopped_R[r]
                                               else None, tokenizer, split_special_tokens, env, name, turn)
                if not _fits(len(played.tokens_N[n]) + len(observation), max_new_tokens, max_positions):
                    overflowed.append(name)
                    continue  # truncated: the observation and a next action would pass the model's context
                played.add(n, observation)
                going.append(n)
                observations.append(observation)
            if overflowed:
                log.warning("turn %d: %d episode(s) truncated, their observation and a next action of max_new_tokens="
                            "%d would pass the model's max_position_embeddings=%s (e.g. %s)", turn, len(overflowed),
                            max_new_tokens, max_positions, overflowed[0])
            sampler.keep(going)
            if not going:
                break
            sampler.extend(observations)
    except BaseException:
        with clock:
            _close_all(envs_N, names_N, failing=True)
        raise
    with clock:
        _close_all(envs_N, names_N, failing=False)
    _check_returns(played.returns_N, envs_N, names_N)
    return Episodes.from_lists(played.tokens_N, played.policy_N, played.logprobs_N, played.first_lengths_N,
                               played.turns_N, played.done_N, played.last_stopped_N, played.returns_N, first_N,
                               metrics=played.metrics, group_size=group_size, pad_id=pad_token_id,
                               env_s=clock.seconds, logprob_dtype=dtype)


class _Transcripts:
    """N episodes as `play` builds them, turn by turn, in python lists (a tensor appended to would be copied every
    turn): each transcript's tokens, who put each one there, the sampler's log-probs; and each outcome."""

    def __init__(self, first_ids_N: list[list[int]]):
        N = len(first_ids_N)
        self.tokens_N = [list(ids) for ids in first_ids_N]
        self.policy_N = [[False] * len(ids) for ids in first_ids_N]
        self.logprobs_N = [[0.0] * len(ids) for ids in first_ids_N]
        self.first_lengths_N = [len(ids) for ids in first_ids_N]
        self.turns_N, self.done_N, self.last_stopped_N, self.returns_N = [0] * N, [False] * N, [False] * N, [0.0] * N
        self.metrics: dict = {}  # key -> (sum, count) over every step

    def add(self, n: int, ids: list[int], logprobs: list[float] | None = None) -> None:
        """Tokens at the end of episode n's transcript: the policy's (with their log-probs), else the environment's."""
        self.tokens_N[n] += ids
        self.policy_N[n] += [logprobs is not None] * len(ids)
        self.logprobs_N[n] += logprobs if logprobs is not None else [0.0] * len(ids)

    def record(self, n: int, turn: int, stopped: bool, result: StepResult) -> None:
        """Episode n's action of `turn` (ended at a stop token or not) and what the environment answered."""
        self.turns_N[n], self.last_stopped_N[n], self.done_N[n] = turn, stopped, result.done
        self.returns_N[n] += float(result.reward)
        for key, value in result.metrics.items():
            total, count = self.metrics.get(key, (0.0, 0))
            self.metrics[key] = (total + value, count + 1)


class _Clock:
    """Seconds spent inside its `with` blocks, summed."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start


def check_replay(env, seed: int, name: str, first) -> None:
    """`env`, a fresh environment of an episode played with `seed` whose first observation was `first`, must give
    that observation again: an environment that keeps state across episodes (or draws randomness not from its
    seed) would replay other episodes after a resume, and train other weights, without a word."""
    try:
        again = _reset(env, seed, name)
    finally:
        _close_all([env], [name], failing=False)
    if again != first:
        raise ValueError(f"{_where(env, name)}: reset with the same seed gave another first observation ({first!r:.60} "
                         f"then {again!r:.60}): an episode must be a pure function of (example, seed, actions) — no "
                         "state kept across episodes, no randomness but the seed's — or a resumed run replays other "
                         "episodes than the uninterrupted one")


def _where(env, name: str, turn: int | None = None) -> str:
    return f"environment {env_name(env)} on {name}" + (f", turn {turn}" if turn is not None else "")


def _reset(env, seed: int, name: str):
    try:
        observation = env.reset(seed)
    except (Exception, SystemExit) as e:  # an environment's sys.exit() must not end the run as if it succeeded
        raise RuntimeError(f"{_where(env, name)}: reset raised {type(e).__name__}: {e}") from e
    if isinstance(observation, str) and observation:
        check_text(observation, f"{_where(env, name)}: reset's observation")
        return observation
    if isinstance(observation, list) and observation:
        check_messages(observation, f"{_where(env, name)}: reset's messages")
        return observation
    raise TypeError(f"{_where(env, name)}: reset must return the first observation, a non-empty str or a non-empty "
                    f"list of chat messages; got {observation!r:.80}")


def _step(env, action: str, name: str, turn: int) -> StepResult:
    try:
        result = env.step(action)
    except ScoreError:  # a reward function's error (a prompt's one-turn environment) names it and the example
        raise
    except (Exception, SystemExit) as e:  # an environment's sys.exit() must not end the run as if it succeeded
        raise RuntimeError(f"{_where(env, name, turn)}: step raised {type(e).__name__}: {e} (action {action!r:.80})"
                           ) from e
    if not isinstance(result, StepResult):
        raise TypeError(f"{_where(env, name, turn)}: step must return a paperloop.envs.StepResult, got "
                        f"{type(result).__name__} {result!r:.80}")
    if as_score(result.reward) is None:
        raise ValueError(f"{_where(env, name, turn)}: step's reward must be a finite number, got {result.reward!r:.40}")
    if not isinstance(result.done, (bool, int)) or isinstance(result.done, float):
        raise TypeError(f"{_where(env, name, turn)}: step's done must be a bool, got {result.done!r:.40}")
    if not isinstance(result.metrics, Mapping) or not all(
            isinstance(k, str) and k and as_score(v) is not None for k, v in result.metrics.items()):
        raise ValueError(f"{_where(env, name, turn)}: step's metrics must map names to finite numbers, got "
                         f"{result.metrics!r:.80}")
    return StepResult(as_score(result.reward), bool(result.done), result.observation,
                      {k: as_score(v) for k, v in result.metrics.items()})


def _first_ids(observation, tokenizer, split: bool, env, name: str) -> list[int]:
    ids = prompt_ids(observation, tokenizer, split, where=_where(env, name) + ": the first observation")
    if not ids:
        raise ValueError(f"{_where(env, name)}: the first observation tokenizes to no tokens at all")
    return ids


def _observation_ids(observation, chat: list | None, action: str, stop_token: int | None, tokenizer, split: bool,
                     env, name: str, turn: int) -> list[int]:
    """The tokens an observation appends after the action: text as it is; in a chat episode, the template's text
    from the end of the action's content through the observation's messages and the next generation prompt — less
    the stop token the policy itself sampled (the template's end-of-turn marker, written by the policy)."""
    where = _where(env, name, turn)
    if chat is None:
        if not isinstance(observation, str):
            raise TypeError(f"{where}: the episode began with text, so an observation is a str; got "
                            f"{type(observation).__name__} {observation!r:.80}")
        check_text(observation, f"{where}: the observation")
        return tokenizer(observation, add_special_tokens=False, split_special_tokens=split)["input_ids"]
    if not isinstance(observation, list) or not observation:
        raise TypeError(f"{where}: the episode began with chat messages, so an observation is a non-empty list of "
                        f"messages (e.g. [{{'role': 'user', 'content': ...}}]); got {observation!r:.80}")
    for message in observation:
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise TypeError(f"{where}: an observation message is a dict with 'role' and 'content' strings; got "
                            f"{message!r:.80}")
        check_text(message["content"], f"{where}: an observation message's content")
    before = render_chat(tokenizer, chat, True, where)
    chat.append({"role": "assistant", "content": action})
    through = render_chat(tokenizer, chat, False, where)
    chat.extend(dict(m) for m in observation)
    after = render_chat(tokenizer, chat, True, where)
    # Where the action's content ends in the template's text: as sampled, or as a template that normalizes the
    # content's whitespace writes it (Llama 3's `| trim`); the transcript keeps the tokens the policy sampled.
    end = next((len(before) + len(content) for content in (action, action.rstrip(), action.strip(), action.lstrip())
                if through.startswith(before + content)), None)
    if end is None or not after.startswith(through):
        raise ValueError(f"{where}: the chat template does not render the conversation so far as a prefix of the "
                         "next turn's (it rewrites earlier turns or the assistant's content), so the transcript "
                         "cannot be continued token for token")
    for message in observation:  # a template that renders only the roles it knows drops the others in silence
        if message["content"].strip() not in after[len(through):]:
            raise ValueError(f"{where}: the chat template does not render the observation's {message['role']!r} "
                             f"message (its content is not in the text), so the policy would never see it; give it "
                             f"a role the template renders (ToolEnv: result_role='user')")
    ids = tokenizer(after[end:], add_special_tokens=False)["input_ids"]
    return ids[1:] if ids and ids[0] == stop_token else ids


def _close_all(envs_N: list, names_N: list[str], failing: bool) -> None:
    """Close every environment, whatever one of them raises: the first error (naming the environment) is raised
    once all are closed — unless the episodes are `failing` by an error already, which stays the one raised."""
    errors = []
    for env, name in zip(envs_N, names_N):
        close = getattr(env, "close", None)
        try:
            if callable(close):
                close()
        except (Exception, SystemExit) as e:
            errors.append(RuntimeError(f"{_where(env, name)}: close raised {type(e).__name__}: {e}"))
            errors[-1].__cause__ = e
    if errors and failing:
        log.error("while the episodes were ending with an error, %s", errors[0])
    elif errors:
        raise errors[0]


def _check_returns(returns_N: list[float], envs_N: list, names_N: list[str]) -> None:
    """An episode's return (a sum of step rewards) must stay within float32's range: past it the advantages
    overflow to inf, and every update would be skipped as non-finite without a word on why."""
    for env, name, total in zip(envs_N, names_N, returns_N):
        if as_score(total) is None:
            raise ValueError(f"{_where(env, name)}: the episode's rewards sum to {total:.4g}, beyond float32's range "
                             f"({SCORE_LIMIT:.3g}): the advantages would overflow; scale the rewards down")


def _fits(length: int, max_new_tokens: int, max_positions: int | None) -> bool:
    return max_positions is None or length + max_new_tokens <= max_positions


def _check_room(length: int, max_new_tokens: int, max_positions: int | None, env, name: str, turn: int,
                what: str) -> None:
    if not _fits(length, max_new_tokens, max_positions):
        raise ValueError(f"{_where(env, name, turn if turn else None)}: {what} is {length} tokens; with max_new_tokens="
                         f"{max_new_tokens} the next action would pass the model's max_position_embeddings="
                         f"{max_positions}; shorten the observations, or lower max_turns or max_new_tokens")


"""Multi-turn environments (`paperloop.envs`, `RLTrainer(env=...)`): updates on transcripts against a naive loop that
rebuilds every transcript from what the environment saw, exact resume when killed in the middle of an episode, chat
episodes rendered by the template, metrics, and the errors that name the environment, the example and the turn. (The
KV-cached turn sampler the episodes are played with, paperloop.lm.sampling, is tested in tests/lm/test_sampling.py.)"""

import functools
import statistics
from pathlib import Path

import pytest
import torch

from paperloop import ConfigError, RLConfig
from paperloop.callbacks import LambdaCallback
from paperloop.checkpoint import committed
from paperloop.envs import Env, StepResult
from paperloop.rl import Episodes
from paperloop.rl.envs import episode_seed
from paperloop.rl.rollouts import rollout_batch

from tests.support.workers import run_worker
from tests.support.rl import RESUME_RUNS, Retry, SGDRLTrainer, make_lm, make_prompts, make_rl_trainer, make_tokenizer

WORKER = Path(__file__).with_name("resume_worker.py")  # the RL fixture, killed mid-run

# ---- training on transcripts against a naive loop --------------------------------------------------------------


def rebuild(tokens, prompt_ids, record, stop, max_new_tokens, tok):
    """The policy mask of one transcript, derived from what the environment saw alone: after the prompt, each
    action runs to its first stop token or max_new_tokens, and each observation but the last follows it exactly as
    the tokenizer writes it. Checks that the action the environment got is the decoded action."""
    assert tokens[:len(prompt_ids)] == prompt_ids
    position, mask = len(prompt_ids), [0] * len(prompt_ids)
    for turn, (action_text, observation) in enumerate(zip(record["actions"], record["observations"])):
        window = tokens[position:position + max_new_tokens]
        end = next((i + 1 for i, t in enumerate(window) if t in stop), len(window))
        assert tok.decode(tokens[position:position + end], skip_special_tokens=True) == action_text
        mask += [1] * end
        position += end
        if turn + 1 < len(record["actions"]):  # the last step's observation is never shown
            ids = tok(observation, add_special_tokens=False)["input_ids"]
            assert tokens[position:position + len(ids)] == ids
            mask += [0] * len(ids)
            position += len(ids)
    assert position == len(tokens)
    return mask


def naive_on_transcripts(cfg, transcripts, records, steps):
    """GRPO by the formulas on each episode's transcript, one unpadded float64 forward each: the policy loss on the
    policy's tokens only, ρ against the log-probs before the step's first update, per-sequence mean over the
    update's episodes, group-std advantages of the returns the environment gave."""
    tok = make_tokenizer()
    policy = make_lm(tok).double()
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}
    N, G = cfg.batch_size * cfg.num_generations, cfg.num_generations
    for s in range(steps):
        rows = list(zip(transcripts[s * N:(s + 1) * N], records[s * N:(s + 1) * N]))
        masks = [torch.tensor(rebuild(t, tok(r["example"]["prompt"])["input_ids"], r, stop, cfg.max_new_tokens, tok)
                              [1:], dtype=torch.bool) for t, r in rows]
        returns = [sum(r["rewards"]) for _, r in rows]
        advantages = []
        for g in range(0, N, G):
            group = returns[g:g + G]
            spread = max(group) != min(group)
            advantages += [(x - statistics.mean(group)) / (statistics.stdev(group) + 1e-4) if spread else 0.0
                           for x in group]

        def logprobs(tokens):
            full = torch.log_softmax(policy(torch.tensor([tokens]), use_cache=False).logits[0, :-1], dim=-1)
            return full.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]

        with torch.no_grad():
            old = [logprobs(t) for t, _ in rows]
        per_update = cfg.minibatch_size * G
        for _ in range(cfg.inner_epochs):
            for start in range(0, N, per_update):
                optimizer.zero_grad()
                losses = []
                for n in range(start, start + per_update):
                    ratio = torch.exp(logprobs(rows[n][0]) - old[n])
                    a = advantages[n]
                    token_loss = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)
                    losses.append(token_loss[masks[n]].mean())
                (sum(losses) / len(losses)).backward()
                optimizer.step()
    return policy


def test_updates_on_transcripts_match_a_naive_loop_from_what_the_environment_saw(tmp_path):
    Retry.log = []
    try:
        trainer = make_rl_trainer(tmp_path, env=Retry, max_turns=3, max_steps=3, lr=0.2, inner_epochs=2,
                                  minibatch_size=2, model=make_lm(make_tokenizer()).double())
        transcripts, outputs = [], []
        play = trainer.play

        def recording_play(*args, **kwargs):
            episodes = play(*args, **kwargs)
            transcripts.extend(episodes.transcripts())
            return episodes

        trainer.play = recording_play
        trainer.callbacks.append(LambdaCallback(on_batch_end=lambda t, o: outputs.append(o)))
        trainer.fit()
        records = [r for r in Retry.log if r["actions"]]  # not the replay check's extra reset (no action)
    finally:
        Retry.log = None
    assert len(records) == len(transcripts) == 3 * 16
    turns = [len(r["actions"]) for r in records]
    assert len(set(turns)) > 1 and max(turns) == 3  # several turns, and some episodes end early
    expected = naive_on_transcripts(trainer.config, transcripts, records, steps=3)
    initial = make_lm(make_tokenizer()).double().state_dict()
    moved = 0.0
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(trainer.unwrapped_model.state_dict()[name], value, rtol=0, atol=1e-10)
        moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-3
    first = outputs[0]
    assert first["rollout/turns_mean"] == pytest.approx(statistics.mean(turns[:16]))
    assert first["rollout/truncated_frac"] == pytest.approx(
        statistics.mean(r["actions"][-1] != r["example"]["answer"] for r in records[:16]))
    assert first["env/solved"] == pytest.approx(
        statistics.mean(a == r["example"]["answer"] for r in records[:16] for a in r["actions"]))
    env_tokens = sum(sum(map(len, r["observations"][:-1])) for r in records[:16])  # one token per character here
    prompt_tokens = sum(len(make_tokenizer()(r["example"]["prompt"])["input_ids"]) for r in records[:16])
    after_prompt = sum(len(t) for t in transcripts[:16]) - prompt_tokens
    assert first["rollout/env_tokens_frac"] == pytest.approx(env_tokens / after_prompt)


def test_the_batch_trains_the_policy_tokens_only_by_hand():
    episodes = Episodes.from_lists([[1, 5, 6, 2, 7, 8, 9], [1, 5, 3]], [[0, 0, 1, 1, 0, 1, 1], [0, 0, 1]],
                                   [[0.0, 0.0, -0.5, -0.25, 0.0, -1.0, -2.0], [0.0, 0.0, -3.0]], [2, 2], [2, 1],
                                   [True, False], [True, True], [1.0, 0.0], ["a", "b"], metrics={}, group_size=2,
                                   pad_id=0)
    batch = rollout_batch(episodes, torch.tensor([0.5, -0.5]), trained_N=torch.tensor([True, True]))
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 7, 8], [1, 5, 0, 0, 0, 0]]
    assert batch["target_tokens"].tolist() == [[5, 6, 2, 7, 8, 9], [5, 3, 0, 0, 0, 0]]
    assert batch["weights"].tolist() == [[0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 0]]
    assert batch["sampling_logprobs"].tolist() == [[0, -0.5, -0.25, 0, -1, -2], [0, -3, 0, 0, 0, 0]]
    masked = rollout_batch(episodes, torch.zeros(2), trained_N=torch.tensor([True, False]))
    assert masked["weights"][1].sum() == 0


# ---- exact resume ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kill, checkpoint", [
    (["--kill-in-env-step", "3", "--kill-at-turn", "2"], "step-000002"),  # between two turns of an episode
    (["--kill-in-generate", "5", "--kill-in-round", "2"], "step-000004"),  # sampling turn 2, after an observation
])
def test_sigkill_in_the_middle_of_an_episode_then_resume_is_bitwise_identical(tmp_path, tmp_path_factory, kill,
                                                                              checkpoint):
    proc = run_worker(WORKER, "--out", tmp_path, "--run", "env", *kill, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert committed(tmp_path / "checkpoints")[0].name == checkpoint
    resumed = make_rl_trainer(tmp_path, **RESUME_RUNS["env"])
    resumed.fit(resume="latest")
    straight = make_rl_trainer(tmp_path_factory.mktemp("env"), **RESUME_RUNS["env"])
    straight.fit()
    assert resumed.state.global_step == straight.state.global_step == 8
    for name, value in straight.unwrapped_model.state_dict().items():
        assert torch.equal(resumed.unwrapped_model.state_dict()[name], value), name
    assert torch.equal(resumed.sampling_generator.get_state(), straight.sampling_generator.get_state())
    assert resumed.state.train_loss_history == straight.state.train_loss_history


def test_episode_seeds_come_from_run_seed_step_example_and_generation(tmp_path):
    Retry.log = []
    try:
        make_rl_trainer(tmp_path, env=Retry, max_turns=2, max_steps=2).fit()
        seen = [(r["seed"], r["example"]) for r in Retry.log if r["actions"]]  # not the replay check's reset
    finally:
        Retry.log = None
    assert len({seed for seed, _ in seen}) == len(seen) == 32  # every episode its own seed
    prompts = make_prompts(24)
    for k, (seed, example) in enumerate(seen):  # step k // 16, generation k % 4, the example's index in train_data
        assert any(prompts[i] == example and episode_seed(0, k // 16, i, k % 4) == seed for i in range(24))


# ---- chat episodes -----------------------------------------------------------------------------------------


class ChatRetry(Env):
    """The chat form of Retry: messages in, messages out."""

    def __init__(self, example):
        self.example, self.messages = example, [{"role": "user", "content": example["prompt"]}]

    def reset(self, seed):
        return list(self.messages)

    def step(self, action):
        self.messages.append({"role": "assistant", "content": action})
        if action == self.example["answer"]:
            return StepResult(reward=1.0, done=True)
        self.messages.append({"role": "user", "content": "=" + action[:1]})
        return StepResult(reward=0.0, observation=[self.messages[-1]])


def test_chat_observations_are_the_templates_next_turn_and_carry_no_weight(tmp_path):
    """The fixture's template writes <|role|>content<|end|> per message and <|assistant|> to prompt: the first
    observation is the rendered user turn, and after each action the environment's tokens are the template's
    <|end|> (unless the policy wrote it as its stop token) and the next user turn with the generation prompt."""
    trainer = make_rl_trainer(tmp_path, env=ChatRetry, max_turns=3, max_steps=1, max_new_tokens=3)
    tok = trainer.tokenizer
    episodes = trainer.play(trainer.fetch(torch.arange(4)), list(range(16)), ["x"] * 4, 4, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    end = tok.convert_tokens_to_ids("<|end|>")
    kept_end = truncated = 0
    policies = [row[:len(tokens)] for row, tokens in zip(episodes.policy_N_T.tolist(), episodes.transcripts())]
    for n, (tokens, policy) in enumerate(zip(episodes.transcripts(), policies)):
        example = trainer.train_data[n // 4]
        first = [tok.bos_token_id] + ids(f"<|user|>{example['prompt']}<|end|><|assistant|>")
        assert tokens[:len(first)] == first and episodes.first_lengths_N[n] == len(first)
        segments, current, mine = [], [], True  # alternating policy / environment runs after the first observation
        for token, flag in zip(tokens[len(first):], policy[len(first):]):
            if bool(flag) != mine:
                segments.append(current)
                current, mine = [], bool(flag)
            current.append(token)
        segments.append(current)
        actions, between = segments[0::2], segments[1::2]
        assert len(actions) == episodes.turns_N[n] and len(between) == len(actions) - 1
        for action, framing in zip(actions, between):
            text = tok.decode(action, skip_special_tokens=True)
            stopped = action[-1] == end
            kept_end += stopped
            truncated += len(action) == 3 and not stopped
            assert framing == [end] * (not stopped) + ids(f"<|user|>={text[:1]}<|end|><|assistant|>")
    assert kept_end and truncated  # both endings of an action were seen


# ---- metrics, truncation, validation ---------------------------------------------------------------------


class Never(Env):
    """An episode that never ends by itself: every action gets 0.1 and the observation "="."""

    def __init__(self, example):
        pass

    def reset(self, seed):
        return "1+1="

    def step(self, action):
        return StepResult(reward=0.1, observation="=", metrics={"one": 1.0})


def test_max_turns_truncates_an_episode_and_says_so(tmp_path):
    outputs = []
    trainer = make_rl_trainer(tmp_path, env=Never, max_turns=3, max_steps=1,
                              callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    assert outputs[0]["rollout/turns_mean"] == 3 and outputs[0]["rollout/truncated_frac"] == 1
    assert outputs[0]["reward/mean"] == pytest.approx(0.3) and outputs[0]["env/one"] == 1
    record = outputs[0]["records/rollouts"][0]
    assert record["turns"] == 3 and record["truncated"] and record["prompt"] == "1+1="


def test_validation_plays_episodes_greedily_and_samples_pass_at_k(tmp_path):
    val = make_prompts(6, seed=3)
    trainer = make_rl_trainer(tmp_path, env=Retry, max_turns=2, val_data=val, eval_num_generations=4,
                              eval_pass_threshold=0.5)
    first, again = trainer.validate(), trainer.validate()
    assert first == again  # the same episodes at every validation
    assert set(first) >= {"val/reward", "val/turns_mean", "val/pass@1", "val/pass@4", "val/reward_mean"}
    assert 1 <= first["val/turns_mean"] <= 2
    assert first["val/pass@1"] <= first["val/pass@4"]


# ---- errors --------------------------------------------------------------------------------------------


class Faulty(Retry):
    def __init__(self, example, fault):
        super().__init__(example)
        self.fault = fault

    def reset(self, seed):
        if self.fault == "reset":
            raise KeyError("no such level")
        if self.fault == "bad first":
            return 7
        return super().reset(seed)

    def step(self, action):
        result = super().step(action)
        if len(self.record["actions"]) < 2:
            return result
        if self.fault == "raise":
            raise ZeroDivisionError("boom")
        if self.fault == "tuple":
            return (1.0, False, "x")
        if self.fault == "nan":
            return StepResult(reward=float("nan"))
        if self.fault == "messages":
            return StepResult(observation=[{"role": "user", "content": "2"}])
        if self.fault == "huge":
            return StepResult(observation="1" * 500)
        return result


@pytest.mark.parametrize("fault, message", [
    ("reset", r"environment Faulty on train example \d+: reset raised KeyError: 'no such level'"),
    ("bad first", "reset must return the first observation"),
    ("raise", r"environment Faulty on train example \d+, turn 2: step raised ZeroDivisionError: boom"),
    ("tuple", "turn 2: step must return a paperloop.envs.StepResult, got tuple"),
    ("nan", "turn 2: step's reward must be a finite number"),
    ("messages", "turn 2: the episode began with text, so an observation is a str"),
])
def test_a_failing_environment_stops_the_run_naming_its_class_the_example_and_the_turn(tmp_path, fault, message):
    trainer = make_rl_trainer(tmp_path, env=functools.partial(Faulty, fault=fault), max_turns=3, max_steps=1)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        trainer.fit()


def test_what_cannot_go_with_an_environment_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_turns: .* needs an environment"):
        make_rl_trainer(tmp_path, max_turns=2)
    with pytest.raises(ValueError, match="reward_fns: with env"):
        SGDRLTrainer(make_lm(make_tokenizer()), RLConfig(output_dir=str(tmp_path)), tokenizer=make_tokenizer(),
                     train_data=make_prompts(8), reward_fns=[lambda p, c, e: 0.0], env=Retry)
    with pytest.raises(ConfigError, match="overlong_buffer"):  # one action's length is a completion's; several's not
        make_rl_trainer(tmp_path, env=Retry, max_turns=2, overlong_buffer=2)
    with pytest.raises(TypeError, match="env: a callable"):
        make_rl_trainer(tmp_path, env="Retry")


def test_dynamic_sampling_draws_more_episodes_and_resumes_after_them(tmp_path):
    outputs = []
    run = dict(env=Retry, max_turns=2, dynamic_sampling=True, max_sample_rounds=3, max_steps=3, max_epochs=None,
               checkpoint_every_steps=1)
    trainer = make_rl_trainer(tmp_path / "a", callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))],
                              **run)
    trainer.fit()
    assert all(o["rollout/zero_std_frac"] <= 0.25 or o["rollout/sample_rounds"] == 3 for o in outputs)
    resumed = make_rl_trainer(tmp_path / "b", **{**run, "max_steps": 2})
    resumed.fit()
    again = make_rl_trainer(tmp_path / "b", **run)
    again.fit(resume="latest")
    for name, value in trainer.unwrapped_model.state_dict().items():
        assert torch.equal(again.unwrapped_model.state_dict()[name], value), name

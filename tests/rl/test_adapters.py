"""Tasks and environments written elsewhere, played through RLTrainer: a reasoning-gym task as prompts scored by its
own scorer (and as one-turn environments), learned by a tiny model; skyrl-gym's multi-turn gsm8k trained and resumed
bitwise after a SIGKILL in the middle of an episode (adapters_worker.py)."""

import json
import statistics
from pathlib import Path

import pytest
import torch

from paperloop import RLConfig, RLTrainer
from paperloop.checkpoint import committed
from paperloop.models.lm import tiny_causal_lm, word_level_tokenizer
from paperloop.rl import ReasoningGymEnv, reasoning_gym_examples, reasoning_gym_score

from tests.support.workers import run_worker

WORKER = Path(__file__).with_name("adapters_worker.py")
GCD = dict(task="gcd", max_value=30)  # "Find the Greatest Common Divisor (GCD) of these numbers: 13, 30. ..."


def gcd_examples(size=64, seed=0):
    pytest.importorskip("reasoning_gym")
    return reasoning_gym_examples(GCD["task"], size=size, seed=seed, max_value=GCD["max_value"])


def gcd_trainer(out, data, seed=0, **overrides) -> RLTrainer:
    chars = sorted((set("".join(e["prompt"] for e in data)) | set("0123456789")) - {" "})
    tok = word_level_tokenizer(chars, per_character=True)
    model = tiny_causal_lm(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=seed)
    cfg = dict(batch_size=8, num_generations=8, max_new_tokens=2, lr=1e-2, max_steps=40, seed=seed,
               output_dir=str(out), log_every_steps=1)
    cfg.update(overrides)
    reward_fns = [] if "env" in cfg else [reasoning_gym_score]
    env = cfg.pop("env", None)
    return RLTrainer(model, RLConfig(**cfg), tokenizer=tok, train_data=data, reward_fns=reward_fns, env=env)


def test_reasoning_gym_examples_are_the_tasks_own_drawn_from_the_seed_and_scored_by_its_scorer():
    import reasoning_gym

    data = gcd_examples(size=8)
    assert data == gcd_examples(size=8) and data != gcd_examples(size=8, seed=1)
    entries = reasoning_gym.create_dataset("gcd", size=8, seed=0, max_value=30)
    for example, entry in zip(data, entries):
        assert example["prompt"] == entry["question"] and example["answer"] == entry["answer"]
        assert reasoning_gym_score(None, f" {entry['answer']}\n", example) == 1.0
        assert reasoning_gym_score(None, "x", example) == entries.score_answer("x", entry) == 0.0
        env = ReasoningGymEnv(example)
        assert env.reset(seed=0) == example["prompt"]
        result = env.step(entry["answer"])
        assert (result.reward, result.done, result.metrics) == (1.0, True, {"correct": 1.0})
    chat = reasoning_gym_examples("gcd", size=1, seed=0, chat=True, instruction="Answer briefly. ", max_value=30)[0]
    assert chat["messages"] == [{"role": "user", "content": "Answer briefly. " + data[0]["prompt"]}]
    with pytest.raises(ValueError, match="reasoning-gym task 'no_such_task'"):
        reasoning_gym_examples("no_such_task", size=1, seed=0)
    with pytest.raises(ValueError, match="make examples with reasoning_gym_examples"):
        reasoning_gym_score(None, "1", {"prompt": "p", "answer": "1"})


def test_a_reasoning_gym_task_as_prompts_and_as_one_turn_environments_trains_the_same(tmp_path):
    data = gcd_examples(size=16)
    as_prompts = gcd_trainer(tmp_path / "prompts", data, max_steps=3)
    as_prompts.fit()
    as_envs = gcd_trainer(tmp_path / "envs", data, max_steps=3, env=ReasoningGymEnv)
    as_envs.fit()
    assert as_prompts.state.train_loss_history == as_envs.state.train_loss_history
    for name, value in as_prompts.unwrapped_model.state_dict().items():
        assert torch.equal(as_envs.unwrapped_model.state_dict()[name], value), name


def test_a_tiny_model_learns_a_reasoning_gym_task_from_its_scorer(tmp_path):
    """GCD of two numbers up to 30, scored by reasoning-gym, from a random tiny model: the mean reward of the last 10
    of 40 steps exceeds that of the first 5 by more than 0.08. Measured (seeds 0-3, 2026-12-07): first 5 steps
    0.016-0.045, last 10 0.195-0.231, a rise of 0.16-0.21; the margin is half the smallest."""
    trainer = gcd_trainer(tmp_path, gcd_examples())
    trainer.fit()
    rewards = [line["reward/mean"] for line in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert len(rewards) == 40
    assert statistics.mean(rewards[-10:]) - statistics.mean(rewards[:5]) > 0.08, rewards


def test_skyrl_gym_multi_turn_gsm8k_trains_and_resumes_bitwise_after_a_sigkill_mid_episode(tmp_path,
                                                                                           tmp_path_factory):
    pytest.importorskip("skyrl_gym")
    from tests.rl.adapters_worker import make_trainer, warm_model

    model = tmp_path_factory.mktemp("warm")
    warm_model(model)
    run = tmp_path / "run"
    proc = run_worker(WORKER, "--model", model, "--out", run, "--kill-at-step", 3, check=False, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert committed(run / "checkpoints")[0].name == "step-000002"
    resumed = make_trainer(model, run)
    resumed.fit(resume="latest")
    straight = make_trainer(model, tmp_path / "straight", log_every_steps=1)
    straight.fit()
    assert resumed.state.global_step == straight.state.global_step == 6
    for name, value in straight.unwrapped_model.state_dict().items():
        assert torch.equal(resumed.unwrapped_model.state_dict()[name], value), name
    assert torch.equal(resumed.sampling_generator.get_state(), straight.sampling_generator.get_state())
    assert resumed.state.train_loss_history == straight.state.train_loss_history
    # the run learned from skyrl-gym's own rewards, over episodes of several turns
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["reward/std"] > 0 for line in lines)
    assert max(line["reward/mean"] for line in lines) > 0.2  # a right answer (1.0) is in some group
    assert all(line["rollout/turns_mean"] > 1 for line in lines)

"""Asynchronous generation (RLConfig(async_generation=True, max_lag=k)): a process of its own plays step s's episodes
with the weights after step s - k. k = 0 is the synchronous loop bitwise; k > 0 samples from the right older
weights, corrects the lag with capped importance weights, and resumes bitwise after a SIGKILL with played,
untrained steps in flight; the generation process's errors and death are the trainer's errors, and it never
outlives the trainer."""

import copy
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import paperloop.rl.trainer

from paperloop.callbacks import Callback
from paperloop.checkpoint import committed
from paperloop.config import ConfigError
from paperloop.lm.base import ScorerRaised
from paperloop.rl.advantages import lag_importance_weights

from tests.support.callbacks import TrainedPrompts, trained_prompts
from tests.support.rl import RESUME_RUNS, Retry, SGDRLTrainer, digit_reward, make_rl_trainer
from tests.support.workers import run_worker

WORKER = Path(__file__).with_name("resume_worker.py")


def same_weights(a, b) -> bool:
    return all(torch.equal(b.unwrapped_model.state_dict()[name], value)
               for name, value in a.unwrapped_model.state_dict().items())


# ---- the importance weight ----------------------------------------------------------------------------------


def test_lag_importance_weights_are_the_capped_ratio_of_the_proximal_policy_to_the_sampler():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    weights = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is not the policy's
    weight, capped = lag_importance_weights(old, sampler, weights, cap=1.5)
    torch.testing.assert_close(weight, torch.tensor([[1.5, torch.e ** -1.0, 1.0, 1.0]]))  # e^0.5 = 1.65 is capped
    assert capped.tolist() == [[True, False, False, False]]
    uncapped, none = lag_importance_weights(old, sampler, weights, cap=None)
    torch.testing.assert_close(uncapped[0, 0], torch.tensor(torch.e ** 0.5))
    assert not none.any()
    with pytest.raises(ValueError, match="cap must be"):
        lag_importance_weights(old, sampler, weights, cap=0.5)


# ---- the run ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["mu2", "env"])
def test_lag_zero_is_the_synchronous_loop_bitwise(tmp_path, run):
    """k = 0 through the generation process (two updates a step; a multi-turn environment played there): the same
    weights, losses and sampling stream as the synchronous loop."""
    settings = {**RESUME_RUNS[run], "max_steps": 4, "max_epochs": None}
    sync = make_rl_trainer(tmp_path / "sync", **settings)
    sync.fit()
    lag0 = make_rl_trainer(tmp_path / "async", async_generation=True, max_lag=0, **settings)
    lag0.fit()
    assert same_weights(lag0, sync)
    assert lag0.state.train_loss_history == sync.state.train_loss_history
    assert torch.equal(lag0.sampling_generator.get_state(), sync.sampling_generator.get_state())
    assert lag0.generation.process is None  # stopped with the run


class Recording(SGDRLTrainer):
    """Keeps each step's weights at its start, its first micro-batch, and what the policy loss was given for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights_at, self.batches, self.loss_inputs, self.outputs = [], [], [], []

    def train_step(self, step):
        self.weights_at.append(copy.deepcopy(self.unwrapped_model.state_dict()))
        outputs = super().train_step(step)
        self.outputs.append(outputs)
        return outputs

    def training_step(self, batch):
        if len(self.batches) < len(self.weights_at):
            self.batches.append({k: v.clone() for k, v in batch.items()})
        return super().training_step(batch)


@pytest.mark.parametrize("updates", [1, 2])
def test_lag_one_samples_from_the_weights_one_step_back_and_weights_each_token_by_its_capped_ratio(tmp_path,
                                                                                                 monkeypatch, updates):
    """One update a step (π_old: the training forward's own log-probs) and two (π_old: a no-grad forward first)."""
    settings = dict(async_generation=True, max_lag=1, max_steps=4, max_epochs=None, async_is_cap=1.05, lr=0.5,
                    **({"inner_epochs": 2} if updates == 2 else {}))
    trainer = make_rl_trainer(tmp_path / "a", cls=Recording, **settings)
    real_loss = paperloop.rl.trainer.policy_loss

    def recording_loss(logprobs_B_T, old_B_T, advantages, weights_B_T, **kwargs):
        if len(trainer.loss_inputs) < len(trainer.batches):  # the step's first micro-batch
            trainer.loss_inputs.append((old_B_T.detach().clone(), advantages.detach().clone()))
        return real_loss(logprobs_B_T, old_B_T, advantages, weights_B_T, **kwargs)

    monkeypatch.setattr(paperloop.rl.trainer, "policy_loss", recording_loss)
    trainer.fit()
    monkeypatch.undo()
    again = make_rl_trainer(tmp_path / "b", **settings)
    again.fit()
    assert same_weights(again, trainer)  # whatever the timing of the two processes
    assert [o["async/lag"] for o in trainer.outputs] == [0, 1, 1, 1]
    model = copy.deepcopy(trainer.unwrapped_model)
    capped_any = False
    for s in range(4):
        batch, trained = trainer.batches[s], trainer.batches[s]["weights"] != 0
        model.load_state_dict(trainer.weights_at[max(s - 1, 0)])  # the sampler: W_{s-1}
        sampler = trainer.forward(batch, model, trainer.config.temperature).logprobs.detach()
        torch.testing.assert_close(batch["sampling_logprobs"][trained], sampler[trained], rtol=0, atol=1e-5)
        model.load_state_dict(trainer.weights_at[s])  # the proximal policy: W_s, the step's start
        proximal = trainer.forward(batch, model, trainer.config.temperature).logprobs.detach()
        old_B_T, advantages_B_T = trainer.loss_inputs[s]
        torch.testing.assert_close(old_B_T[trained], proximal[trained], rtol=0, atol=1e-6)
        # the advantage the loss reads is the episode's times min(π_old / π_sampler, cap), token by token
        ratio = (proximal - batch["sampling_logprobs"]).exp()
        episode = batch["advantages"] if batch["advantages"].ndim == 2 else batch["advantages"][:, None]
        expected = episode * ratio.clamp(max=1.05)
        torch.testing.assert_close(advantages_B_T[trained], expected.expand_as(ratio)[trained], rtol=1e-4, atol=1e-6)
        capped_any |= bool(((ratio > 1.05) & trained).any())
        assert trainer.outputs[s]["async/is_capped_frac"] == pytest.approx(
            ((ratio > 1.05) & trained).sum().item() / trained.sum().item(), abs=0.2)
    assert capped_any  # lr=0.5 moves the weights enough for the cap to bite
    assert not any(torch.equal(a, b) for a, b in zip(trainer.weights_at[0].values(), trainer.weights_at[1].values()))


class InProcessLag(SGDRLTrainer):
    """The synchronous loop with the lag made by hand: step s's episodes played in this process by a copy of the
    weights after step max(s - lag, 0), and corrected as a lagged run corrects them."""

    lag = 1

    @property
    def lagged(self) -> bool:
        return True

    def train_step(self, step):
        if not hasattr(self, "history"):
            self.history, self.behaviour = [], copy.deepcopy(self.unwrapped_model).eval()
        self.history.append(copy.deepcopy(self.unwrapped_model.state_dict()))  # W_s, for step s + lag
        self.behaviour.load_state_dict(self.history[max(len(self.history) - 1 - self.lag, 0)])
        return super().train_step(step)

    def play(self, examples, seeds_N, names, group_size, *, temperature, top_p=1.0, generator=None):
        return self.player.play(self.behaviour, examples, seeds_N, names, group_size, temperature=temperature,
                                top_p=top_p, generator=generator)


@pytest.mark.parametrize("lag, run", [(1, {}), (2, {"env": Retry, "inner_epochs": 2, "minibatch_size": 2})],
                         ids=["k1", "k2-env-mu2"])
def test_a_lagged_run_is_the_synchronous_loop_sampling_from_the_weights_k_steps_back_bitwise(tmp_path, lag, run):
    """What the generation process adds to RL is the lag and nothing else: the same weights, losses and sampling
    stream as the synchronous loop that plays each step with a kept copy of the weights k steps back (one update a
    step, and a multi-turn environment with four)."""
    settings = {"prompts": 16, "max_steps": 6, "max_epochs": None, "lr": 0.2, **run}
    by_hand = make_rl_trainer(tmp_path / "by_hand", cls=type("Lag", (InProcessLag,), {"lag": lag}), **settings)
    by_hand.fit()
    lagged = make_rl_trainer(tmp_path / "async", async_generation=True, max_lag=lag, **settings)
    lagged.fit()
    assert same_weights(lagged, by_hand)
    assert lagged.state.train_loss_history == by_hand.state.train_loss_history
    assert torch.equal(lagged.sampling_generator.get_state(), by_hand.sampling_generator.get_state())
    synchronous = make_rl_trainer(tmp_path / "sync", **settings)
    synchronous.fit()
    assert not same_weights(lagged, synchronous)  # the lag is there: the comparison can fail


def test_three_kills_with_steps_in_flight_then_resume_train_the_uninterrupted_runs_prompts_to_its_weights(tmp_path):
    """k = 2, a checkpoint every 2 steps, so each checkpoint holds a queue of two played, untrained steps. Killed
    between steps (3), in step 5's updates, and between steps again (7), each time resumed: every step's prompts
    trained once, and bitwise the uninterrupted run's weights, losses and sampling stream."""
    straight_dir, run = tmp_path / "straight", RESUME_RUNS["async"]
    straight = make_rl_trainer(straight_dir, callbacks=[TrainedPrompts(straight_dir / "trained.jsonl")], **run)
    straight.fit()
    out = tmp_path / "killed"
    for kill, checkpoint in ((["--kill-at-step", "3"], "step-000002"),
                             (["--resume", "--kill-after-update", "22"], "step-000004"),  # step 5's second of 4
                             (["--resume", "--kill-at-step", "7"], "step-000006")):
        proc = run_worker(WORKER, "--out", out, "--run", "async", *kill, check=False, timeout=300)
        assert proc.returncode == -9, proc.stderr[-3000:]
        assert committed(out / "checkpoints")[0].name == checkpoint
        assert_process_gone(int((out / "generation.pid").read_text()))  # it died with the trainer
    resumed = make_rl_trainer(out, callbacks=[TrainedPrompts(out / "trained.jsonl")], **run)
    resumed.fit(resume="latest")
    assert trained_prompts(out / "trained.jsonl") == trained_prompts(straight_dir / "trained.jsonl")
    assert (resumed.state.global_step, resumed.state.updates) == (straight.state.global_step, straight.state.updates)
    assert same_weights(resumed, straight)
    assert resumed.state.train_loss_history == straight.state.train_loss_history
    assert torch.equal(resumed.sampling_generator.get_state(), straight.sampling_generator.get_state())


def assert_process_gone(pid: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):  # dead, not yet reaped by whoever adopted it
            return
        time.sleep(0.2)
    raise AssertionError(f"the generation process {pid} outlived the trainer")


# ---- errors ---------------------------------------------------------------------------------------------------


def failing_reward(prompt, completion, example) -> float:
    if example["answer"] == "7":  # a prompt of the second step or later
        raise ValueError("the reward server is down")
    return digit_reward(prompt, completion, example)


def dying_reward(prompt, completion, example) -> float:
    if example["answer"] == "7":
        os.kill(os.getpid(), signal.SIGKILL)
    return digit_reward(prompt, completion, example)


@pytest.mark.parametrize("reward, error, match", [
    (failing_reward, ScorerRaised, "reward function 'failing_reward' raised ValueError .*the reward server is down"),
    (dying_reward, RuntimeError, r"generation process died \(killed by signal 9\)"),
])
def test_an_error_or_death_in_the_generation_process_is_the_trainers_error(tmp_path, reward, error, match):
    process = []

    class Watch(Callback):
        def on_train_begin(self, trainer):
            process.append(trainer.generation.process)

    trainer = make_rl_trainer(tmp_path, callbacks=[Watch()], reward_fns=(reward,), async_generation=True, max_lag=1)
    with pytest.raises(error, match=match):
        trainer.fit()
    assert trainer.generation.process is None and not process[0].is_alive()


def test_settings_async_generation_cannot_go_with_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="async_generation: not with dynamic_sampling"):
        make_rl_trainer(tmp_path, async_generation=True, dynamic_sampling=True, max_steps=4)
    with pytest.raises(ConfigError, match="max_lag: must be >= 0"):
        make_rl_trainer(tmp_path, async_generation=True, max_lag=-1)
    with pytest.raises(ConfigError, match="async_is_cap"):
        make_rl_trainer(tmp_path, async_generation=True, async_is_cap=0.5)
    with pytest.raises(ConfigError, match="not with lora"):
        make_rl_trainer(tmp_path, async_generation=True, lora={"r": 4, "alpha": 8})
    with pytest.raises(ValueError, match="must be picklable"):
        make_rl_trainer(tmp_path, async_generation=True, reward_fns=(lambda p, c, e: 0.0,))


def test_a_script_without_a_main_guard_is_told_why_the_generation_process_died(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("from tests.support.rl import make_rl_trainer\n"
                      f"make_rl_trainer({str(tmp_path / 'out')!r}, async_generation=True, max_steps=2).fit()\n")
    proc = run_worker(script, check=False, timeout=300)
    assert proc.returncode != 0
    assert "if __name__ == '__main__':" in proc.stderr


class Unpicklable(list):
    def __reduce__(self):
        raise TypeError("a database cursor")


def test_train_data_the_generation_process_cannot_get_is_refused_naming_why(tmp_path):
    trainer = make_rl_trainer(tmp_path, async_generation=True, max_steps=2)
    trainer.train_data = Unpicklable(trainer.train_data)
    with pytest.raises(TypeError, match="async_generation: .* cannot be pickled: a database cursor"):
        trainer.fit()
    assert trainer.generation.process is None

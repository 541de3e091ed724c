"""The README's two RL examples, verbatim: a GRPO run (reward functions, config, fit) and a custom step
(REINFORCE with a mean baseline) written with the public primitives inside the same loop. Each runs here with
fewer steps, and must improve its reward."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

GRPO_EXAMPLE = '''
import random
from paperloop import RLConfig, RLTrainer
from paperloop.callbacks import TensorBoardLogger
from paperloop.models.lm import tiny_causal_lm, word_level_tokenizer

tok = word_level_tokenizer(list("0123456789+="), per_character=True)   # one token per character
rng = random.Random(0)
prompts = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
           ((rng.randrange(10), rng.randrange(10)) for _ in range(2000))]

def correct(prompt, completion, example):     # any number; raising or NaN stops the run, naming the example
    return float(completion == example["answer"])

def close(prompt, completion, example):       # partial credit: how near the number is, -1 without one
    return -min(abs(int(completion) - int(example["answer"])), 18) / 18 if completion.isdigit() else -1.0

config = RLConfig(batch_size=16, num_generations=8, max_new_tokens=4, lr=3e-3, max_steps=100,
                  advantage="group_std", aggregation="sequence_mean",  # GRPO; Dr. GRPO: "none", "constant"
                  output_dir="runs/grpo-addition", checkpoint_every_steps=50, log_every_steps=10)
trainer = RLTrainer(tiny_causal_lm(len(tok), hidden_size=64, num_layers=2), config, tokenizer=tok,
                    train_data=prompts, reward_fns=[correct, close], reward_weights=[1.0, 0.5],
                    val_data=prompts[:100], callbacks=[TensorBoardLogger()])
trainer.fit()                                  # after a crash: trainer.fit(resume="latest")
print(trainer.validate())                      # greedy answers: val/reward, val/reward/correct, ...
'''

REINFORCE_EXAMPLE = '''
import torch
from paperloop.losses import forward_logprobs

class Reinforce(RLTrainer):
    """REINFORCE with the batch's mean reward as baseline, one update per rollout batch."""

    def train_step(self, step):
        rollouts = self.rollout(torch.cat(step.micro_batches))   # G completions per prompt, scored
        rewards_N = rollouts.rewards_N
        batch = rollouts.batch(advantages_N=rewards_N - rewards_N.mean())

        def loss_fn(batch):                                         # -mean over completions of A · Σ_t log π
            logprobs_B_T = forward_logprobs(self.model, batch)
            return -((logprobs_B_T * batch["weights"]).sum(1) * batch["advantages"]).mean()

        self.forward_backward(batch, loss_fn=loss_fn)
        return {**self.optimizer_step(), "reward/mean": rewards_N.mean()}

trainer = Reinforce(tiny_causal_lm(len(tok), hidden_size=64, num_layers=2), config, tokenizer=tok,
                    train_data=prompts, reward_fns=[correct, close], reward_weights=[1.0, 0.5],
                    callbacks=[TensorBoardLogger(log_dir="runs/reinforce")])
trainer.fit()
'''


def rewards(log_dir) -> list[float]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [e.value for e in events.Scalars("reward/mean")]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_grpo_example_runs_and_raises_its_reward(in_tmp):
    namespace = {}
    exec(GRPO_EXAMPLE.replace("max_steps=100", "max_steps=30"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 30 and trainer.state.updates == 30
    curve = rewards(in_tmp / "runs/grpo-addition/tensorboard")  # steps 1, 10, 20, 30
    assert len(curve) == 4 and curve[-1] > curve[0] + 0.2, curve


def test_custom_step_example_trains_inside_the_loop(in_tmp):
    namespace = {}
    exec(GRPO_EXAMPLE.replace("max_steps=100", "max_steps=30").replace("trainer.fit()", "pass"), namespace)
    exec(REINFORCE_EXAMPLE, namespace)
    trainer = namespace["trainer"]
    assert type(trainer).__name__ == "Reinforce" and trainer.state.updates == 30
    curve = rewards(in_tmp / "runs/reinforce")
    assert len(curve) == 4 and curve[-1] > curve[0] + 0.1, curve  # no std normalization: slower than GRPO

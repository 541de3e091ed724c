"""The README's code is what a newcomer copies: every ```python block runs as written. The engine's blocks run
in order in one script; the language-model sections' blocks (SFT, GRPO, a custom RL step, an environment, DPO, a
reward model) run in order in another
with fewer steps: they print what the README says, the SFT loss falls, and the custom REINFORCE step makes the
update of the textbook estimator. (That RL raises accuracy takes longer than a test: the README gives the
measured numbers; tests/rl/test_trainer.py checks the updates against the papers' formulas.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
LM_SECTIONS = ("Fine-tuning a language model", "Reinforcement learning with verifiable rewards",
               "Multi-turn environments and tools", "Preference optimization")

# After the engine's blocks: the custom step the README shows is used, not only defined.
ENGINE_EPILOGUE = """
config = TrainerConfig(max_epochs=2, batch_size=48, lr=1e-2, output_dir="runs/three")
three = ThreeUpdates(model, config, train_data=data)
three.fit()
assert (three.state.global_step, three.state.updates) == (2 * 11, 3 * 2 * 11), three.state
print("README blocks ran")
"""

# The language-model blocks at test length; what they learned is printed as JSON for the test to check.
SHORTER = {"max_steps=300": "max_steps=60", "max_steps=600": "max_steps=10", "max_steps=40": "max_steps=2",
           "max_steps=200": "max_steps=4", "max_steps=100": "max_steps=4"}
LM_EPILOGUE = """
import copy, json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

def scalars(log_dir, tag):
    events = EventAccumulator(log_dir)
    events.Reload()
    return [e.value for e in events.Scalars(tag)]

# The README's REINFORCE step, one update with plain SGD, against the textbook estimator
# -mean_n (r_n - mean r) * sum_t grad log pi(o_n,t), computed here from the same rollouts. The reward (the
# completion's length) varies within the batch, so the update is not zero.
class Checked(Reinforce):
    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)

    def rollout(self, indices):
        self.seen = super().rollout(indices)
        return self.seen

checked = Checked(AutoModelForCausalLM.from_pretrained("runs/sft-addition/model"),
                  dataclasses.replace(reinforce.config, output_dir="runs/checked", max_steps=1), tokenizer=tok,
                  train_data=prompts[100:], reward_fns=[lambda prompt, completion, example: len(completion)])
before = copy.deepcopy(checked.unwrapped_model)
checked.fit()
rewards_N = checked.seen.rewards_N
batch = checked.seen.batch(advantages_N=rewards_N - rewards_N.mean())
logits = before(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
logprobs = torch.log_softmax(logits.float(), -1).gather(-1, batch["target_tokens"][..., None])[..., 0]
estimator = -(((logprobs * batch["weights"]).sum(1)) * batch["advantages"]).mean()
estimator.backward()
moved = max((p_after - (p - 0.1 * p.grad)).abs().max().item()
            for p, p_after in zip(before.parameters(), checked.unwrapped_model.parameters()))

print(json.dumps({"sft_loss": scalars("runs/sft-addition/tensorboard", "train/loss"),
                  "sft_val": sft.validate(), "kd_steps": kd.state.global_step, "rl_steps": [rl.state.global_step, rl.state.updates],
                  "rl_val": rl.validate(), "rl_reward": scalars("runs/grpo-addition/tensorboard", "reward/mean"),
                  "reinforce_updates": reinforce.state.updates,
                  "reinforce_reward": scalars("runs/reinforce/tensorboard", "reward/mean"),
                  "reinforce_rewards_vary": rewards_N.std().item() > 0, "reinforce_vs_estimator": moved,
                  "retry_steps": retry.state.global_step,
                  "retry_turns": scalars("runs/retry/tensorboard", "rollout/turns_mean"),
                  "calculator": calculator({"prompt": "12+7=", "answer": "19"}).step("<call>add(12, 7)</call>")
                  .observation, "dpo_steps": dpo.state.global_step, "dpo_val": dpo.validate(),
                  "dpo_margins": scalars("runs/dpo-addition/tensorboard", "rewards/margins"),
                  "rm_steps": rm.state.global_step, "rm_val": rm.validate(),
                  "scored": scorer(["12+7=", "12+7="], ["19", "18"], [{}, {}])}))
"""


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(the `## ` section it is in, code) for each ```python block, in order."""
    blocks, section = [], ""
    for part in re.split(r"(^## .*$)", text, flags=re.M):
        if part.startswith("## "):
            section = part[3:]
        else:
            blocks += [(section, code) for code in re.findall(r"```python\n(.*?)```", part, flags=re.S)]
    return blocks


def is_lm(section: str) -> bool:
    return section.startswith(LM_SECTIONS)


def run(script: Path, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_engine_block_of_the_readme_runs(tmp_path):
    blocks = [code for section, code in python_blocks(README.read_text()) if not is_lm(section)]
    assert len(blocks) >= 2
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks) + ENGINE_EPILOGUE)
    assert run(script, tmp_path).strip().endswith("README blocks ran")


def test_language_model_blocks_run_print_what_they_say_and_learn(tmp_path):
    readme = README.read_text()
    blocks = [code for section, code in python_blocks(readme) if is_lm(section)]
    assert len(blocks) == 7  # SFT, KD from the SFT model, GRPO from it, REINFORCE as a custom step, an environment, DPO, a reward model
    code = "\n\n".join(blocks)
    for full, short in SHORTER.items():
        assert full in code, full
        code = code.replace(full, short)
    script = tmp_path / "readme_lm.py"
    script.write_text(code + LM_EPILOGUE)
    printed = run(script, tmp_path).splitlines()
    mask_comment = re.search(r"print\(show_mask\(.*# (.*)", readme).group(1)
    assert printed[0] == mask_comment  # what the README says show_mask prints
    result = json.loads(printed[-1])
    sft_loss = result["sft_loss"]  # steps 1, 20, 40, 60 and each epoch's end
    assert len(sft_loss) >= 4 and sft_loss[-1] < 0.6 * sft_loss[0], sft_loss
    assert {"val/loss", "val/perplexity", "val/exact_match", "val/score"} <= set(result["sft_val"])
    assert result["kd_steps"] == 4  # the distillation block, from the SFT model as its teacher
    assert result["rl_steps"] == [10, 10] and len(result["rl_reward"]) == 2  # steps 1 and 10
    assert {"val/reward", "val/reward/correct", "val/completion_len"} <= set(result["rl_val"])
    assert result["reinforce_updates"] == 10 and len(result["reinforce_reward"]) == 2
    # The custom step's update is the REINFORCE estimator's: its sign, its baseline and its mean.
    assert result["reinforce_rewards_vary"] and result["reinforce_vs_estimator"] < 1e-6, result
    # The environment's block: episodes of up to two turns, and the calculator answers a call.
    assert result["retry_steps"] == 2 and all(1 <= t <= 2 for t in result["retry_turns"]), result
    assert result["calculator"] == "<result>19</result>"
    # The preference blocks: DPO's steps and its metrics (the margin moves off 0 as the policy leaves the reference),
    # a reward model's, and its scores as RL's reward function
    assert result["dpo_steps"] == 4 and {"val/rewards/accuracies", "val/rewards/margins", "val/loss"} <= set(
        result["dpo_val"]), result["dpo_val"]
    assert result["dpo_margins"][0] == 0 and result["dpo_margins"][-1] != 0, result["dpo_margins"]
    assert result["rm_steps"] == 4 and "val/rewards/accuracies" in result["rm_val"]
    assert len(result["scored"]) == 2 and all(isinstance(x, float) for x in result["scored"])

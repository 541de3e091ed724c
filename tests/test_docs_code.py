"""The code of the README and the docs pages is what a newcomer copies: every ```python block runs as written, in
the order of `ENGINE_PAGES` and `LM_PAGES` (a page's blocks build on the pages before it). The engine's blocks run
in one script; the language-model guides' blocks (SFT, GRPO, a custom RL step, an environment, DPO, a reward
model, distillation) run in another with fewer steps: they print what the guide says, the SFT loss falls, and the
custom REINFORCE step makes the update of the textbook estimator. (That RL raises accuracy takes longer than a
test: the guides give the measured numbers; tests/rl/test_trainer.py checks the updates against the papers'
formulas.) A ```python block on a page in neither list fails the test: it would never run."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE_PAGES = ("README.md", "docs/guides/own-trainer.md")
LM_PAGES = ("docs/guides/sft.md", "docs/guides/rl.md", "docs/guides/environments.md", "docs/guides/preference.md",
            "docs/guides/distillation.md")

# After the engine's blocks: the custom step of the own-trainer guide is used, not only defined.
ENGINE_EPILOGUE = """
config = TrainerConfig(max_epochs=2, batch_size=48, lr=1e-2, output_dir="runs/three")
three = ThreeUpdates(model, config, train_data=data)
three.fit()
assert (three.state.global_step, three.state.updates) == (2 * 11, 3 * 2 * 11), three.state
print("engine blocks ran")
"""

# The language-model blocks at test length; what they learned is printed as JSON for the test to check.
SHORTER = {"max_steps=300": "max_steps=60", "max_steps=600": "max_steps=10", "max_steps=40": "max_steps=2",
           "max_steps=200": "max_steps=4", "max_steps=100": "max_steps=4", "max_steps=50": "max_steps=2"}
LM_EPILOGUE = """
import copy, json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

def scalars(log_dir, tag):
    events = EventAccumulator(log_dir)
    events.Reload()
    return [e.value for e in events.Scalars(tag)]

# The RL guide's REINFORCE step, one update with plain SGD, against the textbook estimator
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
                  "sft_val": sft.validate(), "kd_steps": kd.state.global_step,
                  "rl_steps": [rl.state.global_step, rl.state.updates],
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
                  "scored": scorer(["12+7=", "12+7="], ["19", "18"], [{}, {}]),
                  "distill_steps": distill.state.global_step,
                  "distill_kl": scalars("runs/distill-addition/tensorboard", "distill/reverse_kl")}))
"""


def python_blocks(page: str) -> list[str]:
    """The ```python blocks of a page (a path from the repository root), in order."""
    return re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(), flags=re.S | re.M)


def test_every_python_block_is_on_a_page_that_runs():
    pages = [str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
             if python_blocks(str(p.relative_to(ROOT)))]
    assert set(pages) <= set(ENGINE_PAGES + LM_PAGES), set(pages) - set(ENGINE_PAGES + LM_PAGES)


def run(script: Path, cwd: Path) -> str:
    # the language-model blocks took 563 s here (2026-12-07) with the 2 cores shared by other jobs
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_engine_block_runs(tmp_path):
    blocks = [code for page in ENGINE_PAGES for code in python_blocks(page)]
    assert len(blocks) == 2  # the README's trainer, a step of your own
    script = tmp_path / "engine_blocks.py"
    script.write_text("\n\n".join(blocks) + ENGINE_EPILOGUE)
    assert run(script, tmp_path).strip().endswith("engine blocks ran")


def test_language_model_blocks_run_print_what_they_say_and_learn(tmp_path):
    blocks = [code for page in LM_PAGES for code in python_blocks(page)]
    # SFT, GRPO from the SFT model, REINFORCE as a custom step, an environment, DPO, a reward model, on-policy
    # distillation, off-policy distillation (KD from the SFT model)
    assert len(blocks) == 8
    code = "\n\n".join(blocks)
    for full, short in SHORTER.items():
        assert full in code, full
        code = code.replace(full, short)
    script = tmp_path / "lm_blocks.py"
    script.write_text(code + LM_EPILOGUE)
    printed = run(script, tmp_path).splitlines()
    mask_comment = re.search(r"print\(show_mask\(.*# (.*)", code).group(1)
    assert printed[0] == mask_comment  # what the SFT guide says show_mask prints
    result = json.loads(printed[-1])
    sft_loss = result["sft_loss"]  # steps 1, 20, 40, 60 and each epoch's end
    assert len(sft_loss) >= 4 and sft_loss[-1] < 0.6 * sft_loss[0], sft_loss
    assert {"val/loss", "val/perplexity", "val/exact_match", "val/score"} <= set(result["sft_val"])
    assert result["kd_steps"] == 4  # the off-policy distillation block, the SFT model its teacher
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
    # distillation: the GRPO model teaches the SFT model, and the teacher's term is logged
    assert result["distill_steps"] == 2 and len(result["distill_kl"]) == 2, result

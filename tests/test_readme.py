"""The README's code is what a newcomer copies: every ```python block runs as written. The engine's blocks run
in order in one script; the language-model sections' blocks (SFT, GRPO, a custom RL step) run in order in another
with fewer steps, and must learn: the SFT loss falls, the RL rewards rise."""

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
LM_SECTIONS = ("Fine-tuning a language model", "Reinforcement learning with verifiable rewards")

# After the engine's blocks: the custom step the README shows is used, not only defined.
ENGINE_EPILOGUE = """
config = TrainerConfig(max_epochs=2, batch_size=48, lr=1e-2, output_dir="runs/three")
three = ThreeUpdates(model, config, train_data=data)
three.fit()
assert (three.state.global_step, three.state.updates) == (2 * 11, 3 * 2 * 11), three.state
print("README blocks ran")
"""

# The language-model blocks at test length; what they learned is printed as JSON for the test to check.
SHORTER = {"max_steps=300": "max_steps=100", "max_steps=600": "max_steps=60"}
LM_EPILOGUE = """
import json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

def scalars(log_dir, tag):
    events = EventAccumulator(log_dir)
    events.Reload()
    return [e.value for e in events.Scalars(tag)]

print(json.dumps({"sft_loss": scalars("runs/sft-addition/tensorboard", "train/loss"),
                  "sft_val": sft.validate(), "rl_steps": [rl.state.global_step, rl.state.updates],
                  "rl_reward": scalars("runs/grpo-addition/tensorboard", "reward/mean"),
                  "reinforce": type(reinforce).__name__, "reinforce_updates": reinforce.state.updates,
                  "reinforce_reward": scalars("runs/reinforce/tensorboard", "reward/mean")}))
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


def test_language_model_blocks_run_and_learn(tmp_path):
    blocks = [code for section, code in python_blocks(README.read_text()) if is_lm(section)]
    assert len(blocks) == 3  # SFT, GRPO from the SFT model, REINFORCE as a custom step
    code = "\n\n".join(blocks)
    for full, short in SHORTER.items():
        assert full in code, full
        code = code.replace(full, short)
    script = tmp_path / "readme_lm.py"
    script.write_text(code + LM_EPILOGUE)
    result = json.loads(run(script, tmp_path).splitlines()[-1])
    sft_loss = result["sft_loss"]
    assert sft_loss[-1] < 0.5 * sft_loss[0], sft_loss
    assert {"val/loss", "val/perplexity", "val/exact_match", "val/score"} <= set(result["sft_val"])
    assert result["rl_steps"] == [60, 60]
    rewards = result["rl_reward"]  # steps 1, 20, 40, 60
    assert len(rewards) == 4 and rewards[-1] > rewards[0], rewards
    assert result["reinforce"] == "Reinforce" and result["reinforce_updates"] == 60
    assert len(result["reinforce_reward"]) == 4

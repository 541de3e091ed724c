"""The README's code is what a newcomer copies: every ```python block runs, in order, as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# After the blocks: the custom step the README shows is used, not only defined.
EPILOGUE = """
config = TrainerConfig(max_epochs=2, batch_size=48, lr=1e-2, output_dir="runs/three")
three = ThreeUpdates(model, config, train_data=data)
three.fit()
assert (three.state.global_step, three.state.updates) == (2 * 11, 3 * 2 * 11), three.state
print("README blocks ran")
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_block_of_the_readme_runs(tmp_path):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks) + EPILOGUE)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("README blocks ran")

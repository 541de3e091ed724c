"""The folder shows the architecture: the engine at the root of `paperloop`, the rooms `paperloop.lm` and
`paperloop.rl`, and imports that run one way (rl -> lm -> engine), checked on every import statement in the
source. A newcomer finds where a change goes from the tree; a shortcut import against the grain fails here."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trainer"  # installed as `paperloop`

# The one place the engine reaches into a room, lazily, inside a function: the CLI's `merge`, the language-model
# room's one subcommand. (`from paperloop import SFTTrainer` loads through the package's __getattr__, no import.)
LAZY_EXCEPTIONS = {"cli.py": "paperloop.lm.lora",
                   "envs.py": "paperloop.rl"}  # `paperloop.envs`: the short public name of the rl room's environments


def imports(path: Path, package: str) -> set[str]:
    """Every module `path` imports (absolute names), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import lm`
    return found


def reaches(found: set[str], room: str) -> set[str]:
    return {name for name in found if name == room or name.startswith(room + ".")}


def test_the_engine_imports_no_room_and_lm_does_not_import_rl():
    for path in sorted(PACKAGE.glob("*.py")):
        for room in ("paperloop.lm", "paperloop.rl"):
            allowed = LAZY_EXCEPTIONS.get(path.name, "-")
            for name in reaches(imports(path, "paperloop"), room) - reaches(imports(path, "paperloop"), allowed):
                raise AssertionError(f"engine module {path.name} imports {name}")
    for path in sorted((PACKAGE / "lm").glob("*.py")):
        assert not reaches(imports(path, "paperloop.lm"), "paperloop.rl"), f"lm/{path.name} imports the rl room"
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        found = imports(path, "paperloop.callbacks")
        assert not reaches(found, "paperloop.lm") | reaches(found, "paperloop.rl"), f"callbacks/{path.name}"


def test_the_checker_sees_an_import_against_the_grain(tmp_path):
    module = tmp_path / "plans.py"
    module.write_text("def f():\n    from .rl.losses import policy_loss\n")
    assert reaches(imports(module, "paperloop"), "paperloop.rl") == {"paperloop.rl.losses",
                                                                      "paperloop.rl.losses.policy_loss"}
    inner = tmp_path / "sft.py"
    inner.write_text("from ..rl import RLTrainer\nfrom .data import pad_batch\n")
    assert reaches(imports(inner, "paperloop.lm"), "paperloop.rl") == {"paperloop.rl", "paperloop.rl.RLTrainer"}


def test_the_rooms_are_folders_and_the_root_stays_small():
    assert (PACKAGE / "lm" / "__init__.py").is_file() and (PACKAGE / "rl" / "__init__.py").is_file()
    assert len(list(PACKAGE.glob("*.py"))) <= 15  # the engine, and envs.py: the short name of rl.envs


def test_importing_the_engine_does_not_import_transformers():
    """`import paperloop` for an MLP costs no transformers import; the language-model names load on first use."""
    code = ("import sys, paperloop\nassert 'transformers' not in sys.modules\n"
            "from paperloop import SFTTrainer, RLTrainer\nassert SFTTrainer.__module__ == 'paperloop.lm.sft'\n"
            "from paperloop.rl import group_advantages, policy_loss, pass_at_k\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]

"""The folder shows the architecture: the engine at the root of `paperloop`, the rooms `paperloop.lm` and
`paperloop.rl`, and imports that run one way (rl -> lm -> engine), checked on every import statement in the
source. A newcomer finds where a change goes from the tree; a shortcut import against the grain fails here."""

import ast
import os
import re
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


ROOMS = ("paperloop.lm", "paperloop.rl", "paperloop.preference")


def test_the_engine_imports_no_room_lm_imports_neither_rl_nor_preference_and_those_not_each_other():
    for path in sorted(PACKAGE.glob("*.py")):
        for room in ROOMS:
            allowed = LAZY_EXCEPTIONS.get(path.name, "-")
            for name in reaches(imports(path, "paperloop"), room) - reaches(imports(path, "paperloop"), allowed):
                raise AssertionError(f"engine module {path.name} imports {name}")
    for folder, forbidden in (("lm", ("paperloop.rl", "paperloop.preference")), ("rl", ("paperloop.preference",)),
                              ("preference", ("paperloop.rl",))):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            found = imports(path, f"paperloop.{folder}")
            for room in forbidden:
                assert not reaches(found, room), f"{folder}/{path.name} imports {room}"
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        found = imports(path, "paperloop.callbacks")
        assert not any(reaches(found, room) for room in ROOMS), f"callbacks/{path.name}"


def test_the_checker_sees_an_import_against_the_grain(tmp_path):
    module = tmp_path / "plans.py"
    module.write_text("def f():\n    from .rl.losses import policy_loss\n")
    assert reaches(imports(module, "paperloop"), "paperloop.rl") == {"paperloop.rl.losses",
                                                                      "paperloop.rl.losses.policy_loss"}
    inner = tmp_path / "sft.py"
    inner.write_text("from ..rl import RLTrainer\nfrom .data import pad_batch\n")
    assert reaches(imports(inner, "paperloop.lm"), "paperloop.rl") == {"paperloop.rl", "paperloop.rl.RLTrainer"}


def test_the_rooms_are_folders_and_the_root_stays_small():
    assert all((PACKAGE / room / "__init__.py").is_file() for room in ("lm", "rl", "preference"))
    assert len(list(PACKAGE.glob("*.py"))) <= 15  # the engine, and envs.py: the short name of rl.envs


def test_importing_the_engine_does_not_import_transformers():
    """`import paperloop` for an MLP costs no transformers import; the language-model names load on first use."""
    code = ("import sys, paperloop\nassert 'transformers' not in sys.modules\n"
            "from paperloop import SFTTrainer, RLTrainer\nassert SFTTrainer.__module__ == 'paperloop.lm.sft'\n"
            "from paperloop.rl import group_advantages, policy_loss, pass_at_k\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


# The engine knows no language model (DESIGN): how a model's weights are written and read is the trainer's
# (`write_weights`, `load_weights`), and the lm room's for language models. Its one use of transformers is the
# config's named LR schedules (`steps.config_scheduler`, imported when a schedule is made).
ENGINE_MAY_REACH = {"steps.py": {"transformers", "transformers.get_scheduler"}}
LANGUAGE_MODELS = re.compile(r"(transformers|peft)(\.\w+)*")


def language_model_references(path: Path) -> set[str]:
    """What in `path` reaches transformers or peft: an import at any depth, a module named in a string (for
    importlib or `sys.modules`), and `sys.modules` itself (where a module is found without an import)."""
    found = {name for name in imports(path, "paperloop") if LANGUAGE_MODELS.fullmatch(name)}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and LANGUAGE_MODELS.fullmatch(node.value):
            found.add(repr(node.value))
        if isinstance(node, ast.Attribute) and node.attr == "modules" and getattr(node.value, "id", None) == "sys":
            found.add("sys.modules")
    return found


def test_the_engine_knows_no_language_model():
    for path in sorted(PACKAGE.glob("*.py")):
        found = language_model_references(path) - ENGINE_MAY_REACH.get(path.name, set())
        assert not found, f"engine module {path.name} reaches {sorted(found)}: that is the lm room's to know"


def test_the_checker_sees_a_language_model_behind_a_lazy_import_or_sys_modules(tmp_path):
    module = tmp_path / "checkpoint.py"
    module.write_text("import sys\n\ndef save(model):\n    from peft import get_peft_model_state_dict\n"
                      "    return sys.modules.get('transformers')\n")
    assert language_model_references(module) == {"peft", "peft.get_peft_model_state_dict", "sys.modules",
                                                 "'transformers'"}


def test_checkpoints_of_a_model_that_is_no_language_model_import_neither_transformers_nor_peft(tmp_path):
    """In a fresh interpreter: `import paperloop.checkpoint`, then a run that saves (in the background too) and
    resumes; neither import is made on the way."""
    code = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
            "import paperloop.checkpoint\n"
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n"
            "from tests.support.engine import make_resume_trainer\n"
            f"make_resume_trainer({str(tmp_path)!r}, max_epochs=1, async_checkpoint=True).fit()\n"
            f"make_resume_trainer({str(tmp_path)!r}, max_epochs=2).fit(resume='latest')\n"
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "[]"]

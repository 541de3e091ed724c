"""The `paperloop` command as a user types it."""

import json
import subprocess
import sys

import pytest


def paperloop(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "paperloop.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_list_names_the_papers():
    proc = paperloop("list")
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["distill", "dpo", "grokking", "mnist1d",
                                                                      "retool", "rlvr"]


@pytest.mark.parametrize("override, message", [
    ("learning_rate=0.1", "paperloop: error: learning_rate: Key 'learning_rate' not in 'Config'"),
    ("max_steps=-5", "paperloop: error: max_steps: must be > 0 or null, got -5"),
    ("models=[vit]", "paperloop: error: models: must be a non-empty list"),
    ("=5", "paperloop: error: =5: an override must look like key=value"),
])
def test_bad_override_is_one_line_naming_the_key(override, message):
    proc = paperloop("run", "mnist1d", override)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1


def test_unknown_paper_is_an_error():
    proc = paperloop("run", "resnet")
    assert proc.returncode == 2 and "unknown paper 'resnet'" in proc.stderr


def test_help_works_for_each_command():
    for args in (["--help"], ["run", "--help"], ["list", "--help"]):
        assert paperloop(*args).returncode == 0


def test_help_and_version_answer_without_importing_torch():
    """`paperloop --help` took 3.5-9 s when importing the CLI imported torch for the help text."""
    code = ("import sys\nfrom paperloop.cli import main\n"
            "for argv in (['--help'], ['--version'], ['run', '--help'], ['list', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "print(sorted(name for name in ('torch', 'transformers', 'accelerate') if name in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from importlib.metadata import version

    assert "usage: paperloop" in proc.stdout and f"paperloop {version('paperloop')}" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]"


def test_mnist1d_row_writes_results(tmp_path):
    command = ("run", "mnist1d", f"output_dir={tmp_path}", "models=[mlp]", "shuffled=[false,true]", "max_steps=200",
               "val_every_steps=100", "log_every_steps=100")
    proc = paperloop(*command)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # stderr is a pipe here, as in a batch job: plain lines instead of a progress bar
    for row in ("mlp", "mlp-shuffled"):
        assert f"{row}: training 200 steps\n{row}: step 100/200 (50%), loss " in proc.stderr
        assert f"{row}: step 200/200 (100%)" in proc.stderr
    assert f"wrote its results to {tmp_path}" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["paper"].startswith("Greydanus")
    assert [(r["model"], r["shuffled"], r["paper_test_acc"]) for r in results["rows"]] == [("mlp", False, 68.0),
                                                                                          ("mlp", True, 68.0)]
    for row in results["rows"]:
        assert 20 < row["test_acc"] <= 100 and row["steps"] == 200 and row["seconds"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| mlp | original | 68% |" in table and "| mlp | shuffled | 68% |" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "mlp" / "tensorboard").glob("events.out.tfevents.*"))

    again = paperloop(*command)  # the same command: both rows reused, nothing trained
    assert again.returncode == 0 and again.stdout.count("(finished earlier: reused)") == 2
    assert "training" not in again.stderr and json.loads((tmp_path / "results.json").read_text()) == results
    other = paperloop(*command, "lr=0.02")
    assert other.returncode == 2 and other.stderr.startswith("paperloop: error: output_dir: ")
    assert "(lr: 0.01 there, 0.02 now)" in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_paper_help_lists_every_config_key_with_its_default_and_comment():
    import dataclasses

    from paperloop.papers import mnist1d

    proc = paperloop("run", "mnist1d", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: paperloop run mnist1d [key=value ...]")
    keys = [line.split("=")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  ") and "=" in line
            and not line.lstrip().startswith("paperloop")]
    assert keys == [f.name for f in dataclasses.fields(mnist1d.Config)]
    lines = {line.split("=")[0].strip(): line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert lines["lr"].split() == ["lr=0.01", "Adam", "(a", "finite", "number)"]  # config.yaml's value and comment
    assert lines["threads"].startswith("  threads=1 ") and "intra-op threads" in lines["threads"]
    assert lines["models"].startswith("  models=[logistic,mlp,cnn,gru] ")
    assert "micro-batches per optimizer step" in lines["grad_accum_steps"]  # from TrainerConfig's source


def test_a_busy_output_dir_is_a_one_line_error(tmp_path):
    from paperloop.lock import OutputLock

    with OutputLock(tmp_path):
        proc = paperloop("run", "mnist1d", f"output_dir={tmp_path}", "models=[mlp]", "shuffled=[false]", "max_steps=5")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"paperloop: error: {tmp_path}: another run is writing into this output folder")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_version_is_pyprojects_in_the_command_the_package_and_the_changelog():
    import re
    import tomllib
    from pathlib import Path

    import paperloop as package
    from paperloop.checkpoint import FORMAT

    root = Path(__file__).resolve().parents[2]
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    assert package.__version__ == version
    proc = paperloop("--version")
    assert proc.returncode == 0 and proc.stdout == f"paperloop {version}\n"
    # the newest changelog entry is this version, and it says which checkpoint format it resumes
    changelog = (root / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\S+) — .*?(?=^## |\Z)", changelog, re.M | re.S)
    assert newest.group(1) == version and f'"format": "{FORMAT}"' in newest.group(0)


def test_license_is_the_mit_license_pyproject_names():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    text = (root / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the paperloop authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text

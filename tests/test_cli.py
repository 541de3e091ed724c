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
    assert proc.returncode == 0 and proc.stdout.startswith("mnist1d ")


@pytest.mark.parametrize("override, message", [
    ("learning_rate=0.1", "paperloop: error: learning_rate: Key 'learning_rate' not in 'Config'"),
    ("max_steps=-5", "paperloop: error: max_steps: must be > 0 or null, got -5"),
    ("models=[vit]", "paperloop: error: models: must be a non-empty list"),
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


def test_mnist1d_row_writes_results(tmp_path):
    proc = paperloop("run", "mnist1d", f"output_dir={tmp_path}", "models=[mlp]", "shuffled=[false,true]",
                     "max_steps=200", "val_every_steps=100")
    assert proc.returncode == 0, proc.stderr[-2000:]
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

"""The MNIST-1D paper's pieces: the data as the paper had it, the shuffled variant, the model sizes."""

import json
import os
import signal
import types

import numpy as np
import pytest
import torch

from paperloop import ConfigError
from paperloop.models import build_classifier
from paperloop.papers import mnist1d
from paperloop.papers.mnist1d.data import datasets, generate, position_permutation


_generated: dict = {}


@pytest.fixture(autouse=True)
def _generate_once(monkeypatch):
    """The paper's runs in these tests take the dataset generated once per session (generating it takes
    most of a second); test_generation_is_seeded_and_leaves_numpy_alone calls the real generate()."""
    def cached(data_seed=42):
        if data_seed not in _generated:
            _generated[data_seed] = generate(data_seed)
        return _generated[data_seed]

    monkeypatch.setattr(mnist1d, "generate", cached)


def test_dataset_shapes_and_the_fixed_shuffle():
    raw = mnist1d.generate(42)
    train, test = datasets(raw, shuffled=False, permutation_seed=0)
    assert train.tensors[0].shape == (4000, 40) and test.tensors[0].shape == (1000, 40)
    assert sorted(train.tensors[1].unique().tolist()) == list(range(10))
    s_train, s_test = datasets(raw, shuffled=True, permutation_seed=0)
    perm = position_permutation(40, 0)
    assert not torch.equal(perm, torch.arange(40))
    assert torch.equal(s_train.tensors[0], train.tensors[0][:, perm])  # one permutation, train and test alike
    assert torch.equal(s_test.tensors[0], test.tensors[0][:, perm])
    assert torch.equal(s_train.tensors[1], train.tensors[1])

def test_generation_is_seeded_and_leaves_numpy_alone():
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    a, b = generate(42), generate(42)
    assert np.random.rand() == expected  # make_dataset reseeds numpy; generate() restores the caller's state
    assert (a["x"] == b["x"]).all() and not (generate(1)["x"] == a["x"]).all()


def test_reference_model_sizes():
    # Parameter counts of the paper's reference models for 40-long signals and 10 classes.
    sizes = {name: sum(p.numel() for p in build_classifier(name).parameters()) for name in ("logistic", "mlp", "cnn", "gru")}
    assert sizes == {"logistic": 410, "mlp": 15210, "cnn": 5210, "gru": 5134}
    x = torch.randn(3, 40)
    for name in sizes:
        assert build_classifier(name)(x).shape == (3, 10)


def test_an_interrupted_paper_run_continues_where_it_stopped(tmp_path, monkeypatch):
    cfg = mnist1d.Config(models=("mlp",), shuffled=(False,), max_steps=120, val_every_steps=60,
                         output_dir=str(tmp_path / "straight"))
    straight = mnist1d.run_row(cfg, mnist1d.generate(42), "mlp", False)

    step = mnist1d.Classifier.training_step

    def sigterm_at_step_50(self, batch):
        if self.state.global_step == 50 and not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice in the middle of the row
        return step(self, batch)

    monkeypatch.setattr(mnist1d.Classifier, "training_step", sigterm_at_step_50)
    cfg = mnist1d.Config(**{**vars(cfg), "output_dir": str(tmp_path / "resumed")})
    with pytest.raises(KeyboardInterrupt, match="mlp was interrupted at step 51"):
        mnist1d.run(cfg)
    monkeypatch.setattr(mnist1d.Classifier, "training_step", step)
    mnist1d.run(cfg)
    row = json.loads((tmp_path / "resumed" / "results.json").read_text())["rows"][0]
    assert (row["test_acc"], row["best_test_acc"], row["steps"]) == (straight["test_acc"], straight["best_test_acc"], 120)


# ---- the command: rows recorded and reused, time summed, results merged, progress in plain logs ----


def small(tmp_path, **overrides):
    values = dict(models=("mlp",), shuffled=(False,), max_steps=60, val_every_steps=30, log_every_steps=30,
                  output_dir=str(tmp_path))
    return mnist1d.Config(**{**values, **overrides})


def forbid_training(monkeypatch):
    def no(self, batch):
        raise AssertionError("a finished row was trained again")
    monkeypatch.setattr(mnist1d.Classifier, "training_step", no)


def results(folder):
    return json.loads((folder / "results.json").read_text())


def test_a_finished_row_is_recorded_and_reused(tmp_path, monkeypatch, capsys):
    mnist1d.run(small(tmp_path))
    first = results(tmp_path)
    record = json.loads((tmp_path / "mlp" / "row.json").read_text())
    assert record["result"] == first["rows"][0] and record["seconds"] == first["rows"][0]["seconds"] > 0
    capsys.readouterr()
    forbid_training(monkeypatch)
    mnist1d.run(small(tmp_path))
    assert "(finished earlier: reused)" in capsys.readouterr().out
    assert results(tmp_path) == first


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock for the row's timing and for TimeLimit that moves 0.1 s per training step and at no other time:
    seconds become a count of steps, the same on any machine however busy."""
    import paperloop.callbacks.guards as guards

    clock = {"now": 0.0}
    step = mnist1d.Classifier.training_step

    def ticking(self, batch):
        clock["now"] += 0.1
        return step(self, batch)

    monkeypatch.setattr(mnist1d.Classifier, "training_step", ticking)
    monkeypatch.setattr(mnist1d, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock["now"])
    return clock


def test_an_interrupted_row_finishes_once_and_its_time_sums_both_invocations(tmp_path, monkeypatch, capsys,
                                                                             fake_clock):
    step = mnist1d.Classifier.training_step

    def sigterm_at_step_30(self, batch):
        if self.state.global_step == 30 and not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    monkeypatch.setattr(mnist1d.Classifier, "training_step", sigterm_at_step_30)
    with pytest.raises(KeyboardInterrupt):
        mnist1d.run(small(tmp_path))
    interrupted = json.loads((tmp_path / "mlp" / "row.json").read_text())
    assert interrupted["result"] is None and interrupted["seconds"] == pytest.approx(3.1)  # steps 1-31
    monkeypatch.setattr(mnist1d.Classifier, "training_step", step)
    capsys.readouterr()
    mnist1d.run(small(tmp_path))
    assert "mlp: resumed at step 31 of 60" in capsys.readouterr().err
    row = results(tmp_path)["rows"][0]
    assert row["seconds"] == pytest.approx(6.0)  # 31 steps, then the other 29: nothing counted twice or lost
    forbid_training(monkeypatch)  # finished: never resumed from its old checkpoint again
    mnist1d.run(small(tmp_path))
    assert results(tmp_path)["rows"] == [row]


def test_a_row_stopped_by_a_time_limit_is_continued_not_recorded(tmp_path, monkeypatch, fake_clock):
    """A time limit is an interruption like a signal (`state.interrupted`): the row checkpoints, records no
    result, and the same command continues it to the same result as a run straight through."""
    straight = mnist1d.run_row(small(tmp_path / "straight"), mnist1d.generate(42), "mlp", False)
    limited = small(tmp_path / "limited", time_limit_s=2.05)  # 20 steps of 0.1 s: stops after step 21
    with pytest.raises(KeyboardInterrupt, match="mlp was interrupted at step 21"):
        mnist1d.run(limited)
    record = json.loads((tmp_path / "limited" / "mlp" / "row.json").read_text())
    assert record["result"] is None and not (tmp_path / "limited" / "results.json").exists()
    with pytest.raises(KeyboardInterrupt, match="at step 42"):  # the same command: 21 more steps, then again
        mnist1d.run(limited)
    mnist1d.run(small(tmp_path / "limited"))  # without the limit: it finishes
    row = results(tmp_path / "limited")["rows"][0]
    assert (row["test_acc"], row["best_test_acc"], row["steps"]) == (straight["test_acc"], straight["best_test_acc"],
                                                                     60)


def test_max_steps_below_val_every_steps(tmp_path):
    row = mnist1d.run_row(small(tmp_path, max_steps=20, val_every_steps=250), mnist1d.generate(42), "mlp", False)
    assert row["steps"] == 20 and row["best_test_acc"] == row["test_acc"]  # the final test is the one evaluation


def test_a_subset_merges_into_the_folders_results_and_other_settings_are_refused(tmp_path, capsys):
    mnist1d.run(small(tmp_path, models=("mlp",), shuffled=(True,)))
    mnist1d.run(small(tmp_path, models=("logistic",), shuffled=(False, True)))
    out = capsys.readouterr().out
    assert f"this command's 2 row(s) merged with 1 row(s) from earlier commands in {tmp_path / 'results.json'}" in out
    merged = results(tmp_path)
    assert [(r["model"], r["shuffled"]) for r in merged["rows"]] == [("logistic", False), ("logistic", True),
                                                                     ("mlp", True)]  # the paper's order
    table = (tmp_path / "results.md").read_text()
    assert "| logistic | original |" in table and "| mlp | shuffled |" in table

    with pytest.raises(ConfigError, match=r"^output_dir: .*results.json holds rows run with other settings "
                                          r"\(max_steps: 60 there, 61 now\)"):
        mnist1d.run(small(tmp_path, models=("cnn",), max_steps=61))
    assert not (tmp_path / "cnn").exists() and results(tmp_path) == merged


def sigterm_at_first_step(monkeypatch):
    step = mnist1d.Classifier.training_step

    def preempted(self, batch):
        if not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    monkeypatch.setattr(mnist1d.Classifier, "training_step", preempted)


def test_a_row_folder_with_other_settings_is_refused_before_anything_trains(tmp_path, monkeypatch):
    sigterm_at_first_step(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        mnist1d.run(small(tmp_path))  # interrupted at its first step: a row record, no results.json yet
    forbid_training(monkeypatch)
    with pytest.raises(ConfigError, match=r"^output_dir: .*mlp ran with other settings \(lr: 0.001 there, 0.02 now\)"):
        mnist1d.run(small(tmp_path, lr=0.02))


def test_the_paper_runs_with_its_pinned_thread_count(tmp_path, monkeypatch):
    seen = set()
    step = mnist1d.Classifier.training_step

    def recording(self, batch):
        seen.add(torch.get_num_threads())
        return step(self, batch)

    monkeypatch.setattr(mnist1d.Classifier, "training_step", recording)
    assert torch.get_num_threads() == 1
    mnist1d.run(small(tmp_path, threads=2, max_steps=5))
    assert seen == {2} and torch.get_num_threads() == 1  # applied while training, then put back
    assert results(tmp_path)["settings"]["threads"] == 2
    assert "2 intra-op thread(s)" in (tmp_path / "results.md").read_text()


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    mnist1d.run(small(tmp_path))
    err = capsys.readouterr().err
    assert "mlp: training 60 steps" in err
    assert [line.split(" (")[0] for line in err.splitlines() if ": step " in line] == ["mlp: step 30/60", "mlp: step 60/60"]

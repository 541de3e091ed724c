"""The MNIST-1D paper's pieces: the data as the paper had it, the shuffled variant, the model sizes."""

import json
import os
import signal

import numpy as np
import pytest
import torch

from paperloop.models import build_classifier
from paperloop.papers import mnist1d
from paperloop.papers.mnist1d.data import datasets, generate, position_permutation


def test_dataset_shapes_and_the_fixed_shuffle():
    raw = generate(42)
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

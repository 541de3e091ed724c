"""Checkpoints and exact resume: a run killed anywhere and resumed ends bitwise where a run that was
never interrupted ends; broken or tampered checkpoints are refused without running any code."""

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

import paperloop.checkpoint as ckpt
from paperloop.callbacks import EarlyStopping, LambdaCallback
from tests.support.callbacks import Recorder, StopAt
from tests.support.engine import (Regression, assert_bitwise_equal, make_resume_trainer, optimizer_tensors,
                                  straight_and_resumed, weights)
from tests.support.workers import run_worker
from paperloop import CheckpointError

WORKER = Path(__file__).with_name("resume_worker.py")
_straight_cache = {}


def straight(tmp_path_factory, accum=1):
    """The uninterrupted run, once per accumulation setting."""
    if accum not in _straight_cache:
        t = make_resume_trainer(tmp_path_factory.mktemp("straight"), grad_accum_steps=accum)
        t.fit()
        _straight_cache[accum] = t
    return _straight_cache[accum]


def assert_same_run(resumed, reference):
    assert_bitwise_equal(weights(resumed.model), weights(reference.model))
    assert_bitwise_equal(optimizer_tensors(resumed), optimizer_tensors(reference))
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert resumed.state.train_loss_history == reference.state.train_loss_history
    assert resumed.state.val_history == reference.state.val_history
    assert resumed.state.global_step == reference.state.global_step == 24


@pytest.mark.parametrize("where", [
    ["--hook", "on_batch_begin", "--step", "4"],  # mid-epoch 0; last checkpoint at step 3
    ["--hook", "on_epoch_begin", "--step", "12"],  # at the boundary into epoch 2
    ["--hook", "on_batch_begin", "--step", "17"],  # mid-epoch 2
    ["--hook", "on_batch_begin", "--step", "23"],  # the last step
], ids=["mid-epoch", "epoch-boundary", "epoch-2", "last-step"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, tmp_path_factory, where):
    proc = run_worker(WORKER, "--out", tmp_path, *where, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = make_resume_trainer(tmp_path)
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight(tmp_path_factory))


def test_sigkill_between_micro_batches_with_accumulation(tmp_path, tmp_path_factory):
    # 2 micro-batches a step: call 21 is the second micro-batch of the 11th step, after the first's backward
    proc = run_worker(WORKER, "--out", tmp_path, "--accum", "2", "--kill-in-call", "21", check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = make_resume_trainer(tmp_path, grad_accum_steps=2)
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight(tmp_path_factory, accum=2))


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, tmp_path_factory, caplog):
    proc = run_worker(WORKER, "--out", tmp_path, "--crash-in-save", "3", check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.committed(folder)] == ["step-000006", "step-000003"]
    assert len(list(folder.glob(".step-000009.tmp-*"))) == 1  # the torn write, left aside
    resumed = make_resume_trainer(tmp_path)
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight(tmp_path_factory))


def test_sigterm_checkpoints_stops_cleanly_and_resumes_exactly(tmp_path, tmp_path_factory):
    proc = run_worker(WORKER, "--out", tmp_path, "--hook", "on_batch_begin", "--step", "7", "--signal", "SIGTERM")
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["stop_reason"] == "signal" and state["global_step"] == 8  # the step in flight finished
    assert ckpt.committed(tmp_path / "checkpoints")[0].name == "step-000008"
    resumed = make_resume_trainer(tmp_path)
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight(tmp_path_factory))


def _finished_run(tmp_path):
    t = make_resume_trainer(tmp_path)
    t.fit()
    return t


def test_damaged_newest_checkpoint_falls_back_and_explicit_path_names_the_file(tmp_path, tmp_path_factory, caplog):
    reference = straight(tmp_path_factory)
    _finished_run(tmp_path)
    newest, previous = ckpt.committed(tmp_path / "checkpoints")[:2]
    weights_file = newest / ckpt.WEIGHTS
    weights_file.write_bytes(weights_file.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match=f"^{weights_file}: size"):
        make_resume_trainer(tmp_path).fit(resume=newest)
    with caplog.at_level(logging.WARNING):
        resumed = make_resume_trainer(tmp_path)
        resumed.fit(resume="latest")
    assert f"skipped {newest}" in caplog.text
    assert_same_run(resumed, reference)  # from the previous checkpoint, on to the same end

    tensors = previous / ckpt.STATE_TENSORS
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0x01  # one flipped bit
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{tensors}: sha256 differs"):
        make_resume_trainer(tmp_path).load_checkpoint(previous)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["manifest-as-was", "manifest-rewritten"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_payloads_run_no_code(tmp_path, fix_manifest, writer):
    _finished_run(tmp_path / "run")
    path = ckpt.committed(tmp_path / "run" / "checkpoints")[0]
    marker = tmp_path / "pwned"
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    for name in manifest["files"]:
        if writer == "pickle":
            (path / name).write_bytes(pickle.dumps(Payload(marker)))
        else:
            torch.save({"weights": Payload(marker)}, path / name)
        if fix_manifest:
            manifest["files"][name] = {"size": (path / name).stat().st_size,
                                       "sha256": __import__("hashlib").sha256((path / name).read_bytes()).hexdigest()}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        make_resume_trainer(tmp_path / "run").fit(resume=path)
    assert not marker.exists()


def test_each_file_alone_replaced_by_a_pickle_runs_no_code(tmp_path):
    """One file at a time, manifest rewritten to match: every reader meets the payload itself."""
    import hashlib
    import shutil

    _finished_run(tmp_path / "run")
    original = ckpt.committed(tmp_path / "run" / "checkpoints")[0]
    marker = tmp_path / "pwned"
    names = list(json.loads((original / ckpt.MANIFEST).read_text())["files"])
    for name in names:
        path = tmp_path / f"tampered-{name}"
        shutil.copytree(original, path)
        torch.save({"x": Payload(marker)}, path / name)
        manifest = json.loads((path / ckpt.MANIFEST).read_text())
        manifest["files"][name] = {"size": (path / name).stat().st_size,
                                   "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
        (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
        trainer = make_resume_trainer(tmp_path / "run")
        if name == "config.yaml":  # for people only: never read back
            trainer.load_checkpoint(path)
        else:
            with pytest.raises(CheckpointError, match=f"^{path / name}"):
                trainer.load_checkpoint(path)
        assert not marker.exists(), name


def test_early_stopping_counters_survive_a_resume(tmp_path):
    script = [5, 4, 4.5, 4.2, 4.1, 3.0]  # best at epoch 2; patience 3 stops at epoch 5

    class Scripted(type(make_resume_trainer(tmp_path / "probe"))):
        def validation_step(self, batch):
            return {"loss": torch.tensor(script[self.state.epoch - 1])}

    def build(out, callbacks=()):
        t = make_resume_trainer(out, max_epochs=6, callbacks=[EarlyStopping(patience=3), *callbacks])
        t.__class__ = Scripted
        return t

    reference = build(tmp_path / "straight")
    assert reference.fit().epoch == 5

    def preempt_after_epoch_3(trainer, logs):
        if trainer.state.epoch == 3:  # two epochs into the patience window
            trainer.request_stop("preempted", resumable=True)

    first = build(tmp_path / "resumed", [LambdaCallback(on_epoch_end=preempt_after_epoch_3)])
    assert first.fit().epoch == 3
    resumed = build(tmp_path / "resumed")
    state = resumed.fit(resume="latest")
    assert state.epoch == 5 and state.stop_reason.startswith("early stopping")
    assert_bitwise_equal(weights(resumed.model), weights(reference.model))


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    done = _finished_run(tmp_path)
    rec = Recorder()
    again = make_resume_trainer(tmp_path, callbacks=[rec])
    state = again.fit(resume="latest")
    assert state.global_step == 24 and state.train_loss_history == done.state.train_loss_history
    assert [c[0] for c in rec.calls] == ["on_train_begin", "on_train_end"]
    assert_bitwise_equal(weights(again.model), weights(done.model))


def test_checkpoint_layout_and_pruning(tmp_path):
    _finished_run(tmp_path)
    folder = tmp_path / "checkpoints"
    kept = [p.name for p in ckpt.committed(folder)]
    # every 3 steps (checkpoint_every_steps), keep_last=3; the rest were removed after newer ones landed;
    # the last one is the closed run, so save_last adds none
    assert kept == ["step-000024", "step-000021", "step-000018"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept + [ckpt.INDEX])
    files = {p.name for p in (folder / "step-000024").iterdir()}
    assert files == {ckpt.WEIGHTS, ckpt.STATE_JSON, ckpt.STATE_TENSORS, "config.yaml", ckpt.MANIFEST}


def test_transformers_checkpoint_loads_with_from_pretrained(tmp_path):
    from torch.utils.data import TensorDataset
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from paperloop import BaseTrainer, TrainerConfig

    class LM(BaseTrainer):
        def training_step(self, batch):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    data = TensorDataset(torch.randint(0, 64, (16, 12)))
    t = LM(model, TrainerConfig(max_steps=3, batch_size=4, output_dir=str(tmp_path)), train_data=data)
    t.save_checkpoint(tmp_path / "before")
    t.fit()
    path = t.save_checkpoint()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert_bitwise_equal(weights(loaded), weights(t.model))
    assert not torch.equal(weights(loaded)["transformer.wte.weight"],
                           weights(AutoModelForCausalLM.from_pretrained(tmp_path / "before"))["transformer.wte.weight"])


def test_a_subclass_state_survives_through_extra_state(tmp_path):
    class Counting(type(make_resume_trainer(tmp_path / "probe"))):
        def training_step(self, batch):
            self.seen = getattr(self, "seen", 0) + len(batch[0])
            self.sum_y = getattr(self, "sum_y", torch.zeros(())) + batch[1].sum()
            return super().training_step(batch)

        def extra_state(self):
            return {"seen": self.seen, "sum_y": self.sum_y}

        def load_extra_state(self, state):
            self.seen, self.sum_y = state["seen"], state["sum_y"]

    def build(out, callbacks=()):
        t = make_resume_trainer(out, callbacks=callbacks)
        t.__class__ = Counting
        return t

    reference, resumed = straight_and_resumed(build, tmp_path, stop_at=10)
    assert resumed.seen == reference.seen == 4 * 48
    assert torch.equal(resumed.sum_y, reference.sum_y)


def test_resume_warns_about_callback_state_it_cannot_place(tmp_path, caplog):
    first = make_resume_trainer(tmp_path, max_epochs=1, callbacks=[EarlyStopping(patience=5), LambdaCallback()])
    first.fit()
    with caplog.at_level(logging.WARNING):
        make_resume_trainer(tmp_path, max_epochs=2).fit(resume="latest")
    assert "holds state for callback EarlyStopping[val/loss], which is not attached" in caplog.text
    assert "LambdaCallback" not in caplog.text  # stateless: nothing saved, nothing to warn about


def test_time_limit_checkpoints_stops_and_resumes_exactly(tmp_path, tmp_path_factory, monkeypatch):
    import paperloop.callbacks.guards as guards
    from paperloop.callbacks import TimeLimit

    clock = {"now": 0.0}
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock["now"])
    tick = LambdaCallback(on_batch_end=lambda t, o: clock.update(now=clock["now"] + 1.0))  # 1 "second" a batch
    state = make_resume_trainer(tmp_path, callbacks=[tick, TimeLimit(seconds=10)]).fit()
    assert state.global_step == 10 and state.stop_reason == "time limit of 10 s"
    assert ckpt.committed(tmp_path / "checkpoints")[0].name == "step-000010"
    resumed = make_resume_trainer(tmp_path)
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight(tmp_path_factory))


def test_artifacts_are_sealed_into_each_checkpoint_and_never_read_back(tmp_path):
    from tests.support.engine import ScheduledRegression

    class WithNotes(ScheduledRegression):
        def write_artifacts(self, directory):
            (directory / "notes.txt").write_text(f"step {self.state.global_step}")

    t = make_resume_trainer(tmp_path, cls=WithNotes, max_epochs=1)
    t.fit()
    path = ckpt.committed(tmp_path / "checkpoints")[0]
    assert (path / "notes.txt").read_text() == "step 6"
    assert "notes.txt" in json.loads((path / ckpt.MANIFEST).read_text())["files"]
    (path / "notes.txt").write_text("edited")  # sealed: an edit is caught like any other file's
    with pytest.raises(CheckpointError, match=f"^{path / 'notes.txt'}: sha256 differs"):
        ckpt.verify(path)  # by a whole check (paperloop merge's); a resume hashes only the files it reads
    make_resume_trainer(tmp_path, cls=WithNotes).load_checkpoint(path)


def test_a_changed_lr_on_resume_keeps_the_checkpoints_and_says_so_everywhere(tmp_path, tmp_path_factory, caplog):
    from paperloop.callbacks import TensorBoardLogger

    stop = StopAt(9)
    make_resume_trainer(tmp_path, callbacks=[stop]).fit()  # lr 0.01, weight decay 0
    with caplog.at_level(logging.WARNING):
        resumed = make_resume_trainer(tmp_path, lr=0.5, weight_decay=0.1, callbacks=[TensorBoardLogger()])
        resumed.fit(resume="latest")
    assert "lr is 0.5 in this run's config but 0.01 in the checkpoint; the run goes on with the checkpoint's 0.01" \
        in caplog.text and "weight_decay is 0.1" in caplog.text
    assert (resumed.config.lr, resumed.config.weight_decay) == (0.01, 0.0)  # what is recorded is what is used
    assert "lr: 0.01" in (ckpt.committed(tmp_path / "checkpoints")[0] / "config.yaml").read_text()
    assert_same_run(resumed, straight(tmp_path_factory))


def test_a_resume_that_would_change_what_the_run_computes_is_refused_naming_the_key(tmp_path):
    """Another max_grad_norm, shuffle or precision resumes into another run than the one checkpointed: refused
    before anything is loaded, naming the key; what may change (length, logging, checkpoints, validation) does."""
    stop = StopAt(5)
    make_resume_trainer(tmp_path, callbacks=[stop]).fit()
    for key, value in (("max_grad_norm", 1.0), ("shuffle", False), ("precision", "bf16")):
        other = make_resume_trainer(tmp_path, **{key: value})
        before = {k: v.clone() for k, v in other.model.state_dict().items()}
        with pytest.raises(CheckpointError, match=f"config: {key} is .* in the checkpoint but {value!r} in this run"):
            other.fit(resume="latest")
        assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in before.items())  # nothing loaded
    state = make_resume_trainer(tmp_path, max_epochs=5, log_every_steps=7, checkpoint_every_steps=4,
                                time_limit_s=1e6).fit(resume="latest")
    assert state.epoch == 5  # a longer run, logged and checkpointed otherwise: the same run going on


def test_a_longer_run_is_refused_when_the_schedule_spans_the_runs_length(tmp_path):
    """A linear schedule built for 10 steps, resumed as a 20-step run, would jump (0.006 at step 5, then 0.007).
    The check follows the schedule the run goes on with, the checkpoint's, not the one this run's config names."""
    stop = StopAt(5)
    linear = dict(cls=Regression, max_epochs=None, lr_scheduler="linear")
    make_resume_trainer(tmp_path / "linear", max_steps=10, callbacks=[stop], **linear).fit()
    for scheduler in ("linear", "constant"):  # "constant": the run would still go on with the checkpoint's linear
        with pytest.raises(CheckpointError, match="config: max_steps is 10 in the checkpoint but 20 .* 'linear' "
                                                  "schedule .* the learning rate would jump"):
            make_resume_trainer(tmp_path / "linear", max_steps=20, **{**linear, "lr_scheduler": scheduler}
                                ).fit(resume="latest")
    lrs = []
    record = LambdaCallback(on_batch_end=lambda t, o: lrs.append(round(t.optimizer.param_groups[0]["lr"], 9)))
    make_resume_trainer(tmp_path / "linear", max_steps=10, callbacks=[record], **linear).fit(resume="latest")
    assert lrs == sorted(lrs, reverse=True) and len(lrs) == 5  # the rest of the same ramp down

    # a checkpoint of a constant schedule may be extended, whatever this run's config names
    constant = dict(cls=Regression, max_epochs=None, lr_scheduler="constant")
    make_resume_trainer(tmp_path / "constant", max_steps=10, callbacks=[stop], **constant).fit()
    lrs.clear()
    make_resume_trainer(tmp_path / "constant", max_steps=20, callbacks=[record], **{**constant, "lr_scheduler": "linear"}
                        ).fit(resume="latest")
    assert lrs == [0.01] * 15



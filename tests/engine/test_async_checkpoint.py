"""Async checkpoint saves (`async_checkpoint=True`): the files a synchronous save writes, an exact resume
from checkpoints written while training went on, a failed background write stops the run with its error,
fit() returns only once its last checkpoint is committed, at most one write in flight, and a SIGKILL in the
middle of a background write loses nothing that was committed (async_checkpoint_worker.py, in a subprocess)."""

import errno
import hashlib
import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import paperloop.checkpoint as ckpt
from tests.engine.async_checkpoint_worker import ASYNC, before, in_writer_thread
from tests.support.engine import assert_bitwise_equal, make_resume_trainer, optimizer_tensors, weights
from tests.support.workers import run_worker
from paperloop import CheckpointError, ConfigError, TrainerConfig
from paperloop.callbacks import LambdaCallback
from paperloop.config import load_config

WORKER = Path(__file__).with_name("async_checkpoint_worker.py")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run with synchronous saves: what every async run and resume must end on."""
    t = make_resume_trainer(tmp_path_factory.mktemp("straight"))
    t.fit()
    return t


def assert_same_run(resumed, reference):
    assert_bitwise_equal(weights(resumed.model), weights(reference.model))
    assert_bitwise_equal(optimizer_tensors(resumed), optimizer_tensors(reference))
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert resumed.state.train_loss_history == reference.state.train_loss_history
    assert resumed.state.val_history == reference.state.val_history
    assert resumed.state.global_step == reference.state.global_step == 24


def step_of(directory: Path) -> int:
    """The step of the checkpoint being written in `directory` (its temporary `.step-000009.tmp-PID`)."""
    return int(re.search(r"step-(\d+)", directory.name)[1])


def join_writers() -> None:
    """Wait until every background checkpoint write has ended (committed or failed)."""
    for thread in threading.enumerate():
        if thread.name.startswith("paperloop-checkpoint"):
            thread.join()


class Progress:
    """The training thread's last finished step, which a writer thread can wait for."""

    def __init__(self):
        self.step, self.changed = 0, threading.Condition()
        self.callback = LambdaCallback(on_batch_end=lambda t, outputs: self.set(t.state.global_step))

    def set(self, step):
        with self.changed:
            self.step = step
            self.changed.notify_all()

    def wait_for(self, step):
        with self.changed:
            assert self.changed.wait_for(lambda: self.step >= step, timeout=30), f"training never reached {step}"


def index_events(folder: Path) -> list[tuple[str, str]]:
    return [(e["event"], e["path"]) for e in map(json.loads, (folder / ckpt.INDEX).read_text().splitlines())]


def file_digests(checkpoint: Path) -> dict[str, str]:
    """sha256 of each file but the manifest, with the one setting that differs between the runs compared
    (async_checkpoint) taken out of the two files that record the config."""
    digests = {}
    for path in sorted(checkpoint.iterdir()):
        if path.name == ckpt.MANIFEST:  # it holds the digests of the two files below
            continue
        data = path.read_bytes()
        if path.name == ckpt.STATE_JSON:
            tree = json.loads(data)
            assert tree["config"].pop("async_checkpoint") in (True, False)
            data = json.dumps(tree).encode()
        if path.name == "config.yaml":
            data = re.sub(rb"async_checkpoint: (true|false)\n", b"", data)
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


def run_twice(tmp_path, build) -> dict:
    """`build(out, async_checkpoint)` fitted with synchronous, then async saves, in the same output_dir with
    the same run id (so the files may be the same bytes); each run's checkpoints' digests and index events."""
    out, runs = tmp_path / "run", {}
    for mode in (False, True):
        t = build(out, mode)
        t.state.run_id = "one-run"  # what a fresh fit draws at random
        t.fit()
        folder = out / "checkpoints"
        for path in ckpt.committed(folder):
            ckpt.verify(path)
        runs[mode] = {"events": index_events(folder), "trainer": t,
                      "files": {p.name: file_digests(p) for p in ckpt.committed(folder)}}
        shutil.move(out, tmp_path / f"async-{mode}")
    return runs


# ---- the same files --------------------------------------------------------------------------------------


def test_async_checkpoints_are_the_files_a_synchronous_save_writes(tmp_path):
    runs = run_twice(tmp_path, lambda out, mode: make_resume_trainer(out, async_checkpoint=mode))
    sync, async_ = runs[False], runs[True]
    assert list(async_["files"]) == ["step-000024", "step-000021", "step-000018"]
    assert async_["files"] == sync["files"]  # weights, optimizer, RNG, data position, callbacks: byte for byte
    assert async_["events"] == sync["events"]  # the same saves, and the same ones pruned, in the same order


def test_an_async_checkpoint_of_a_transformers_model_loads_with_from_pretrained(tmp_path):
    from torch.utils.data import TensorDataset
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from paperloop import BaseTrainer

    class LM(BaseTrainer):
        def training_step(self, batch):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

    def build(out, mode):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))
        data = TensorDataset(torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0)))
        cfg = TrainerConfig(max_steps=6, batch_size=4, checkpoint_every_steps=2, async_checkpoint=mode,
                            output_dir=str(out))
        return LM(model, cfg, train_data=data)

    runs = run_twice(tmp_path, build)
    assert runs[True]["files"] == runs[False]["files"]
    assert "config.json" in runs[True]["files"]["step-000006"]  # save_pretrained's own files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "async-True" / "checkpoints" / "step-000006")
    assert_bitwise_equal(weights(loaded), weights(runs[True]["trainer"].model))  # wte and lm_head tied, as saved


# ---- exact resume from checkpoints written while training went on ----------------------------------------


def test_resume_from_checkpoints_written_while_training_went_on_is_bitwise(tmp_path, straight, monkeypatch):
    progress, written_at = Progress(), {}

    def lag(directory):  # each write begins only once training has taken two more steps (or ended)
        step = step_of(directory)
        if in_writer_thread():
            progress.wait_for(min(step + 2, 24))
        written_at[step] = progress.step

    monkeypatch.setattr(ckpt, "save_weights", before(lag, ckpt.save_weights))
    run = make_resume_trainer(tmp_path / "run", callbacks=[progress.callback], **ASYNC)
    run.fit()
    assert sorted(written_at) == list(range(3, 25, 3))
    assert all(written_at[s] >= min(s + 2, 24) for s in written_at)  # written in the background, late
    assert_same_run(run, straight)
    for name in ("step-000018", "step-000021"):  # the ones kept
        resumed = make_resume_trainer(tmp_path / f"from-{name}", **ASYNC)
        resumed.fit(resume=tmp_path / "run" / "checkpoints" / name)
        assert_same_run(resumed, straight)


# ---- a failed write ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", [6, 24], ids=["mid-run", "last-save"])
def test_a_failed_background_write_stops_the_run_with_its_error(tmp_path, monkeypatch, failing):
    disk_full = OSError(errno.ENOSPC, "No space left on device")

    def fail(directory):
        if step_of(directory) == failing:
            raise disk_full

    monkeypatch.setattr(ckpt, "save_state", before(fail, ckpt.save_state))
    # The write has ended by the time this hook ends: the run must stop right there, before the step trains.
    writer_done = LambdaCallback(on_batch_begin=lambda t, step: join_writers())
    t = make_resume_trainer(tmp_path, callbacks=[writer_done], **ASYNC)
    with pytest.raises(CheckpointError, match=f"step-{failing:06d}: writing the checkpoint in the background "
                                              "failed .*No space left on device") as raised:
        t.fit()
    assert raised.value.__cause__ is disk_full and t.error is raised.value
    assert t.state.global_step == failing  # mid-run: step 7 never ran
    committed = [p.name for p in ckpt.committed(tmp_path / "checkpoints")]
    assert committed[0] == f"step-{failing - 3:06d}"  # and ModelCheckpoint wrote no last one after the error


def test_a_training_error_is_raised_after_the_writes_end_and_a_write_error_then_logged(tmp_path, monkeypatch, caplog):
    raised_boom = threading.Event()

    def fail_after_boom(directory):
        if in_writer_thread():
            raised_boom.wait(timeout=30)
            raise OSError(errno.EIO, "Input/output error")

    def boom(trainer, outputs):
        if trainer.state.global_step == 4:
            raised_boom.set()
            raise RuntimeError("boom")

    monkeypatch.setattr(ckpt, "save_state", before(fail_after_boom, ckpt.save_state))
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="boom"):
        make_resume_trainer(tmp_path, callbacks=[LambdaCallback(on_batch_end=boom)], **ASYNC).fit()
    assert "step-000003: writing the checkpoint in the background failed (OSError" in caplog.text


# ---- fit() waits; one write at a time ---------------------------------------------------------------------


def test_fit_returns_only_once_its_last_checkpoint_is_committed(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_weights", before(lambda d: step_of(d) == 24 and time.sleep(0.5),
                                                     ckpt.save_weights))
    make_resume_trainer(tmp_path, **ASYNC).fit()
    folder = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.committed(folder)] == ["step-000024", "step-000021", "step-000018"]  # pruned too
    ckpt.verify(folder / "step-000024")
    assert not list(folder.glob(".*"))  # no temporary folder left


def test_fit_that_raises_returns_only_once_the_checkpoint_in_flight_is_committed(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_weights", before(lambda d: in_writer_thread() and time.sleep(0.5),
                                                     ckpt.save_weights))

    def boom(trainer, outputs):
        if trainer.state.global_step == 4:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        make_resume_trainer(tmp_path, callbacks=[LambdaCallback(on_batch_end=boom)], **ASYNC).fit()
    assert [p.name for p in ckpt.committed(tmp_path / "checkpoints")] == ["step-000003"]


def test_at_most_one_write_is_in_flight(tmp_path, monkeypatch):
    lock, active, most, threads = threading.Lock(), [0], [0], set()
    finish = ckpt.finish

    def counted(snapshot):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            threads.add(threading.current_thread().name)
        try:
            time.sleep(0.05)  # many steps' time: the next save comes while this one is being written
            finish(snapshot)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ckpt, "finish", counted)
    make_resume_trainer(tmp_path, max_steps=10, checkpoint_every_steps=1, **ASYNC).fit()
    assert most[0] == 1
    assert threading.main_thread().name not in threads  # and they were written in the background
    saved = [p for e, p in index_events(tmp_path / "checkpoints") if e == "saved"]
    assert saved == [f"step-{s:06d}" for s in range(1, 11)]


# ---- guards, config ---------------------------------------------------------------------------------------


def test_a_time_limit_stop_commits_its_async_checkpoint_before_the_run_ends(tmp_path, straight, monkeypatch):
    import paperloop.callbacks.guards as guards
    from paperloop.callbacks import TimeLimit

    clock = {"now": 0.0}
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(ckpt, "save_weights", before(lambda d: in_writer_thread() and time.sleep(0.3),
                                                     ckpt.save_weights))
    tick = LambdaCallback(on_batch_end=lambda t, o: clock.update(now=clock["now"] + 1.0))  # 1 "second" a batch
    at_end = []
    record = LambdaCallback(on_train_end=lambda t: at_end.extend(p.name for p in ckpt.committed(t.checkpoint_dir)))
    state = make_resume_trainer(tmp_path, callbacks=[tick, TimeLimit(seconds=10), record], **ASYNC).fit()
    assert state.global_step == 10 and state.stop_reason == "time limit of 10 s"
    assert at_end[0] == "step-000010"  # committed before the callbacks' on_train_end
    resumed = make_resume_trainer(tmp_path)  # synchronous saves now: a key a resume may change
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight)


def test_a_second_save_at_the_step_of_one_in_flight_gets_a_name_of_its_own(tmp_path, monkeypatch):
    """A time limit at step 6 saves in on_batch_end; ModelCheckpoint's step-6 save waits for the epoch's close,
    the same step: the first is not in its place yet when the second is named."""
    import paperloop.callbacks.guards as guards
    from paperloop.callbacks import TimeLimit

    clock = {"now": 0.0}
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(ckpt, "save_weights", before(lambda d: in_writer_thread() and time.sleep(0.3),
                                                     ckpt.save_weights))
    tick = LambdaCallback(on_batch_end=lambda t, o: clock.update(now=clock["now"] + 1.0))
    make_resume_trainer(tmp_path, callbacks=[tick, TimeLimit(seconds=6)], **ASYNC).fit()
    assert [p.name for p in ckpt.committed(tmp_path / "checkpoints")] == ["step-000006.1", "step-000006",
                                                                           "step-000003"]


def test_async_checkpoint_is_a_flag(tmp_path):
    with pytest.raises(ConfigError, match="^async_checkpoint: must be true or false, got 'yes'"):
        TrainerConfig(async_checkpoint="yes")
    with pytest.raises(ConfigError, match="^async_checkpoint: must be true or false, got 1"):
        TrainerConfig(async_checkpoint=1)
    assert load_config(TrainerConfig, None, ["async_checkpoint=true"]).async_checkpoint is True
    assert TrainerConfig().async_checkpoint is False


def test_a_save_outside_a_hook_is_committed_when_it_returns(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_weights", before(lambda d: time.sleep(0.2), ckpt.save_weights))
    t = make_resume_trainer(tmp_path, **ASYNC)
    path = t.save_checkpoint()
    assert ckpt.committed(tmp_path / "checkpoints") == [path]


# ---- killed in the middle of a background write -----------------------------------------------------------


def test_sigkill_during_a_background_write_keeps_the_committed_ones_and_resumes_bitwise(tmp_path, straight, caplog):
    # The third save (step 9) hangs half-written in its thread while training goes on; SIGKILL before step 12.
    # keep_last=1: step 6 must stay until step 9 is committed, though the lists already name 9 the one kept.
    proc = run_worker(WORKER, "--out", tmp_path, "--hang-in-save", "3", "--keep-last", "1", "--step", "11",
                      check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.committed(folder)] == ["step-000006"]
    (torn,) = folder.glob(".step-000009.tmp-*")
    assert (torn / ckpt.WEIGHTS).is_file() and not (torn / ckpt.MANIFEST).exists()
    with caplog.at_level(logging.WARNING):
        resumed = make_resume_trainer(tmp_path)
        resumed.fit(resume="latest")
    assert "skipped" not in caplog.text  # it never saw the half-written one
    assert_same_run(resumed, straight)


def test_sigterm_commits_the_async_checkpoint_before_fit_returns(tmp_path, straight):
    proc = run_worker(WORKER, "--out", tmp_path, "--slow-writes", "0.5", "--step", "7", "--signal", "SIGTERM")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["state"]["stop_reason"] == "signal" and report["state"]["global_step"] == 8
    assert report["committed_when_fit_returned"][0] == "step-000008"
    resumed = make_resume_trainer(tmp_path, **ASYNC)
    resumed.fit(resume="latest")
    assert_same_run(resumed, straight)


# ---- DDP: every process waits for the main one's write ----------------------------------------------------


def torchrun(out, *args) -> list[dict]:
    run_worker(WORKER, "--ddp", "--out", out, *args, processes=2, timeout=180)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_async_saves_are_committed_for_every_process_and_resume_exactly(tmp_path):
    straight_ranks = torchrun(tmp_path / "straight", "--slow-writes", "0.3")
    for rank in straight_ranks:  # when fit() returned on each process, the last one was committed already
        assert rank["committed_when_fit_returned"][0] == "step-000018"
    stopped = torchrun(tmp_path / "resumed", "--slow-writes", "0.3", "--stop-at", "8")
    assert [r["committed_when_fit_returned"][0] for r in stopped] == ["step-000008"] * 2
    resumed = torchrun(tmp_path / "resumed", "--resume")
    assert resumed[0]["weights"] == straight_ranks[0]["weights"]  # bitwise: float lists compared exactly
    assert resumed[0]["state"]["train_loss_history"] == straight_ranks[0]["state"]["train_loss_history"]

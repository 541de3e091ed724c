"""The output-folder lock: two runs never write into one output_dir at once; the lock goes away
however a run ends; a lock left by a killed run is taken over, and says so."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import paperloop.checkpoint as ckpt
from tests.support.engine import make_resume_trainer
from tests.support.workers import run_worker
from paperloop.lock import LOCK_NAME, OutputLock, OutputLockError

HOLD = """
import sys, os, signal
from paperloop.lock import OutputLock
lock = OutputLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
{then}
"""


def holder(folder, then="sys.stdin.read()"):
    """A separate process holding the lock on `folder` (until its stdin closes, by default)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(then=then), str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_run_into_a_busy_output_dir_is_refused_naming_folder_pid_and_host(tmp_path):
    first = holder(tmp_path)
    try:
        with pytest.raises(OutputLockError) as e:
            make_resume_trainer(tmp_path).fit()
        message = str(e.value)
        assert message.startswith(f"{tmp_path}: another run is writing into this output folder")
        assert f"pid {first.pid} on host {socket.gethostname()}" in message
        assert not (tmp_path / "checkpoints").exists()  # refused before writing anything
    finally:
        first.stdin.close()
        first.wait()
    assert not (tmp_path / LOCK_NAME).exists()  # the holder removed it on its way out (atexit)
    make_resume_trainer(tmp_path, max_epochs=1).fit()


def test_two_locks_in_one_process_conflict_too(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(OutputLockError, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path).acquire()
    with OutputLock(tmp_path):  # released: free again
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_and_says_so(tmp_path, caplog):
    dead = holder(tmp_path, then="os.kill(os.getpid(), signal.SIGKILL)")
    assert dead.wait() == -signal.SIGKILL
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == dead.pid  # left behind
    with caplog.at_level(logging.WARNING):
        state = make_resume_trainer(tmp_path, max_epochs=1).fit()
    assert state.global_step == 6
    assert f"taking over the lock left by pid {dead.pid} on host {socket.gethostname()}" in caplog.text
    assert "which is no longer running" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


class Boom(Exception):
    pass


def test_the_lock_is_released_when_fit_raises(tmp_path):
    trainer = make_resume_trainer(tmp_path)
    step = trainer.training_step

    def failing(batch):
        if trainer.state.global_step == 2:
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()  # held while training
            raise Boom()
        return step(batch)

    trainer.training_step = failing
    with pytest.raises(Boom):
        trainer.fit()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / "metrics.jsonl").unlink()  # the failed run's log: a new run goes only where no other run's history is
    assert make_resume_trainer(tmp_path, max_epochs=1).fit().global_step == 6


def test_the_lock_is_released_after_a_sigterm_the_trainer_handled(tmp_path):
    proc = run_worker(Path(__file__).with_name("lock_worker.py"), "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["signal", "True", "False"]  # held while training, gone after the stop
    assert ckpt.committed(tmp_path / "checkpoints")[0].name == "step-000005"


def test_atexit_releases_a_lock_that_was_never_released(tmp_path):
    proc = holder(tmp_path, then="sys.exit(0)")
    assert proc.wait() == 0
    assert not (tmp_path / LOCK_NAME).exists()


def test_only_the_main_process_locks(tmp_path):
    with OutputLock(tmp_path, enabled=False):
        assert not (tmp_path / LOCK_NAME).exists()
        with OutputLock(tmp_path):  # a disabled lock holds nothing
            assert (tmp_path / LOCK_NAME).exists()


def test_an_output_dir_that_cannot_hold_files_is_an_error_naming_it(tmp_path):
    from tests.support.engine import Regression, make_data, make_model
    from paperloop import ConfigError, TrainerConfig

    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        for folder in (a_file, read_only / "run", Path("/proc/paperloop-run")):
            trainer = Regression(make_model(), TrainerConfig(max_steps=1, output_dir=str(folder)),
                                 train_data=make_data(8))
            if folder.parent == read_only and os.access(read_only, os.W_OK):  # root ignores the mode bits
                continue
            with pytest.raises(ConfigError, match=f"^output_dir: {folder} cannot hold the run's files"):
                trainer.fit()
    finally:
        read_only.chmod(0o700)
    assert a_file.read_text() == "mine"

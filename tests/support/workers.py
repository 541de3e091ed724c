"""`run_worker`: the one way these tests start a worker script, in one process or in N under torchrun.

A worker script imports `tests.support` as the tests do: pytest puts the repository root (the folder above the
`tests` package) on `sys.path`, and `run_worker` puts it on the worker's `PYTHONPATH`. To run a worker by hand,
from the repository root: `python -m tests.engine.resume_worker --out /tmp/run --step 7`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: README.md, pyproject.toml, trainer/, tests/


def run_worker(script: str | Path, *args, processes: int = 1, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python script args` (processes=1), or `torchrun --standalone --nproc-per-node N script args` (gloo on CPU,
    a free port each launch), with the output captured as text: the one way these tests start a worker script.

    Every process runs one thread (OMP_NUM_THREADS=1), as the tests do (conftest.py), so that numbers compare
    bitwise between a test and its workers; the repository root is on PYTHONPATH. With `check`, an exit status
    other than 0 fails the test with the command, the status and the tail of both outputs; pass `check=False` when
    the worker is meant to die (SIGKILL: returncode -9) and assert what you expect. Past `timeout` seconds the
    worker and every process it started (torchrun's) are killed, and the test fails the same way."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [*launcher, str(script), *map(str, args)]
    env = worker_env()
    # A session of its own, so that a timeout kills the whole group: torchrun's processes too.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            raise AssertionError(_failure(cmd, f"ran past {timeout} s and was killed", stdout, stderr)) from None
        except BaseException:  # an interrupted test run (Ctrl-C) leaves no worker behind
            _kill_group(proc)
            raise
    if check and proc.returncode != 0:
        raise AssertionError(_failure(cmd, f"exited with {proc.returncode}", stdout, stderr))
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def worker_env() -> dict[str, str]:
    """The environment of a worker process: one thread, the repository root on PYTHONPATH (for a test that must
    drive its worker itself, e.g. signal it mid-run)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _failure(cmd: list[str], what: str, stdout: str, stderr: str, tail: int = 3000) -> str:
    return (f"OMP_NUM_THREADS=1 PYTHONPATH={ROOT} {' '.join(cmd)}\n{what}\n"
            f"--- stdout (last {tail} characters) ---\n{stdout[-tail:]}\n"
            f"--- stderr (last {tail} characters) ---\n{stderr[-tail:]}")

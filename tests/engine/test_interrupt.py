"""Ctrl-C in a user's script: the run finishes its step, checkpoints, says so, and fit() raises KeyboardInterrupt
once the run has ended, so the script stops (exit status of SIGINT) instead of printing results that look final; a
script that catches it finds `state.interrupted`. A SIGTERM (a preemption) checkpoints and says so too, and fit()
returns with `state.interrupted` for the script (or its scheduler) to act on. Each run is a subprocess sent the
signal mid-run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import paperloop.checkpoint as ckpt
from tests.support.workers import worker_env

WORKER = Path(__file__).with_name("interrupt_worker.py")


def run_and_signal(out, sig, *args, after_step=3) -> tuple[subprocess.CompletedProcess, int]:
    """The worker, sent `sig` once it has printed `after_step`; its exit and output, and the last step it printed."""
    proc = subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=worker_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line == f"step {after_step}\n":
            proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + stdout, stderr), after_step


def last_checkpoint_step(out) -> int:
    newest = ckpt.committed(Path(out) / "checkpoints")[0]
    return json.loads((newest / ckpt.STATE_JSON).read_text())["train_state"]["global_step"]


def test_ctrl_c_checkpoints_says_so_and_stops_the_script(tmp_path):
    proc, sent = run_and_signal(tmp_path, signal.SIGINT)
    # The script ends on the uncaught KeyboardInterrupt. (Its status is -SIGINT only where nothing evaluates a string
    # at exit: CPython 3.11 clears its "died of Ctrl-C" flag on any eval, and torch's atexit dump_compile_times
    # imports tabulate, whose namedtuples are evals, when tabulate is installed; the status is then 1.)
    assert proc.returncode in (-signal.SIGINT, 1), proc.stderr[-2000:]
    assert proc.stderr.rstrip().splitlines()[-1].startswith("KeyboardInterrupt: "), proc.stderr[-2000:]
    assert "results" not in proc.stdout  # the lines after fit() never ran
    step = last_checkpoint_step(tmp_path)
    assert step >= sent and proc.stdout.splitlines()[-1] == f"step {step}"  # the step in flight finished, no more
    assert f"SIGINT: the run stops after step {step}, checkpointed in {tmp_path / 'checkpoints'}" in proc.stderr
    assert f"KeyboardInterrupt: {tmp_path}: interrupted at step {step} (signal), checkpointed; " \
           "fit(resume='latest') continues it" in proc.stderr

    resumed = subprocess.run([sys.executable, str(WORKER), "--out", str(tmp_path), "--resume"], capture_output=True,
                             text=True, timeout=120, env=worker_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout.splitlines()[-1].removeprefix("results "))
    assert result == {"interrupted": False, "stop_reason": None, "global_step": 120}


def test_a_script_that_catches_the_ctrl_c_finds_the_state_interrupted(tmp_path):
    proc, _ = run_and_signal(tmp_path, signal.SIGINT, "--catch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    caught = json.loads(proc.stdout.splitlines()[-1].removeprefix("caught "))
    assert caught == {"interrupted": True, "stop_reason": "signal", "global_step": last_checkpoint_step(tmp_path)}


def test_a_sigterm_checkpoints_says_so_and_returns_interrupted(tmp_path):
    proc, _ = run_and_signal(tmp_path, signal.SIGTERM)
    assert proc.returncode == 0, proc.stderr[-2000:]
    step = last_checkpoint_step(tmp_path)
    result = json.loads(proc.stdout.splitlines()[-1].removeprefix("results "))
    assert result == {"interrupted": True, "stop_reason": "signal", "global_step": step}
    assert f"SIGTERM: the run stops after step {step}, checkpointed in" in proc.stderr
    assert "KeyboardInterrupt" not in proc.stderr

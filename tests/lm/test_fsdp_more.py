"""FSDP2 (strategy="fsdp") on 2 CPU processes, the cases a mutation pass found untested: a checkpoint written by 1
process continued on 2 (the data order and the global batch are the checkpoint's; the process the checkpoint holds
streams for takes them, the one beyond is seeded from (seed, rank, step)); loading a model with tied embeddings
(the alias the checkpoint stores once is restored); validation with unequal batch counts per process (in lockstep:
every forward is a collective, the filler batches count nothing); and generation that stops only when every process
has finished (rank 0's rows stop at once, rank 1's run on)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import paperloop.checkpoint as ckpt
from paperloop.callbacks import LambdaCallback
from paperloop.lm.sampling import sample
from paperloop.rng import mixed_seed, reseed, set_rng_state

from tests.lm.fsdp_more_worker import RUN, VOCAB, rng_digest, tied_model, tokenizer, trainer
from tests.support.workers import worker_env

WORKER = Path(__file__).with_name("fsdp_more_worker.py")


def torchrun(out, checkpoint, timeout: float = 240) -> subprocess.CompletedProcess:
    """The worker on 2 processes, its output in files (a worker left behind must not hold a pipe open). One that
    hangs (a collective that one process never joins) is stopped through torchrun, which takes its workers down."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), "--checkpoint", str(checkpoint)]
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=worker_env())
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun's agent stops its workers (SIGTERM, then SIGKILL) before it exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, (out / "stdout.txt").read_text(),
                                       (out / "stderr.txt").read_text())


def expected_streams(state: dict, rank: int, written_by: int) -> dict:
    """The RNG streams a process of a resumed run starts from: the checkpoint's for a process it holds, else seeded
    from (seed, rank, step). Computed here and this process's own streams put back."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        if rank < written_by:
            set_rng_state(state["processes"][rank])
        else:
            reseed(mixed_seed(RUN["seed"], rank, state["train_state"]["global_step"]))
        return rng_digest()
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def test_a_one_process_checkpoint_of_a_tied_model_continues_on_two_fsdp_processes(tmp_path):
    straight = trainer(tmp_path / "straight", 1)
    straight.fit()
    stop = LambdaCallback(on_batch_end=lambda t, o: t.state.global_step == 3
                          and t.request_stop("test preemption", resumable=True))
    trainer(tmp_path / "stopped", 1, callbacks=[stop], checkpoint_every_steps=3).fit()
    checkpoint = ckpt.committed(tmp_path / "stopped" / "checkpoints")[0]
    state = ckpt.read(checkpoint)
    assert "lm_head.weight" not in state["model"]  # tied: stored once, under the embedding's name

    proc = torchrun(tmp_path, checkpoint)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Each process's streams: rank 0 the checkpoint's own, rank 1 (beyond the 1 it was written by) seeded afresh
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rng-rank{rank}.json").read_text()) == expected_streams(state, rank, 1), rank
    assert expected_streams(state, 0, 1) != expected_streams(state, 1, 1)

    # Where the 1-process run straight through lands (float64: the same math to rounding), tied weights still tied
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    for name, value in straight.unwrapped_model.state_dict().items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-10, msg=name)
    assert torch.equal(resumed["lm_head.weight"], resumed["model.embed_tokens.weight"])
    report = json.loads((tmp_path / "resumed.json").read_text())
    assert report["global_step"] == straight.state.global_step
    # Validation on 9 examples, batches of 4 on each process: 2 on rank 0, 1 (and a filler) on rank 1
    assert [h["step"] for h in report["val_history"]] == [h["step"] for h in straight.state.val_history]
    for mine, theirs in zip(report["val_history"], straight.state.val_history):
        assert mine["val/loss"] == pytest.approx(theirs["val/loss"], rel=1e-10, abs=0)

    # Generation: rank 0's rows stopped at their first token, rank 1's ran to max_new_tokens, in lockstep
    first, second = (json.loads((tmp_path / f"sample-rank{r}.json").read_text()) for r in (0, 1))
    assert [len(row) for row in first] == [1, 1]
    assert [len(row) for row in second] == [10, 10]
    alone = tied_model()
    prompts = [tokenizer()("sort 3 1 2 =")["input_ids"], tokenizer()("sort 9 =")["input_ids"]]
    expected = sample(alone, prompts, 1, 10, generator=torch.Generator(), temperature=0.0,
                      eos_token_id=[len(VOCAB) + 7], pad_token_id=0).completions()
    assert second == expected  # the same greedy tokens as one process alone

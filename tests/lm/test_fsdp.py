"""strategy="fsdp" (FSDP2) for SFT on 2 CPU processes: the same numbers as 1 process with the same global batch,
checkpoints in the format every run writes (full state dicts: `from_pretrained` loads them), an exact resume after
SIGKILL, and a 2-process checkpoint continued in 1 process. RL with FSDP: tests/rl/test_fsdp.py."""

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paperloop import ConfigError, SFTConfig, SFTTrainer
from paperloop.checkpoint import CheckpointError, committed

from tests.lm.fsdp_worker import SFT_RUN, sft_trainer
from tests.support.workers import run_worker
from tests.support.lm import model, sorting_examples, tokenizer

WORKER = Path(__file__).with_name("fsdp_worker.py")


def torchrun(out, what, check=True) -> subprocess.CompletedProcess:
    return run_worker(WORKER, "--out", out, "--what", what, processes=2, timeout=240, check=check)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def test_fsdp_matches_one_process_resumes_bitwise_and_continues_in_one_process(tmp_path):
    proc = torchrun(tmp_path, "sft")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fsdp = load_file(str(tmp_path / "straight.safetensors"))
    single = sft_trainer(tmp_path / "single", 1)
    single.fit()
    assert single.state.global_step == 12
    initial = model().double().state_dict()
    for name, value in weights(single).items():  # float64: the same math to rounding
        torch.testing.assert_close(fsdp[name], value, rtol=0, atol=1e-10)
    assert max((v - initial[k]).abs().max().item() for k, v in fsdp.items()) > 1e-3  # it trained

    # A checkpoint of the sharded run is a transformers folder of the whole model
    from transformers import AutoModelForCausalLM

    checkpoint = committed(tmp_path / "straight" / "checkpoints")[0]  # newest first
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).state_dict()
    assert all(torch.equal(loaded[k], fsdp[k]) for k in fsdp)

    # SIGKILL after the checkpoint of step 3, then resume
    killed = torchrun(tmp_path, "killed", check=False)
    assert killed.returncode != 0
    stopped = tmp_path / "stopped" / "checkpoints"
    assert [p.name for p in committed(stopped)] == ["step-000003"]
    # In 1 process with batch_size doubled (the same global batch): where the 1-process run lands
    alone = sft_trainer(tmp_path / "alone", 1)
    alone.fit(resume=stopped / "step-000003")
    for name, value in weights(single).items():
        torch.testing.assert_close(weights(alone)[name], value, rtol=0, atol=1e-10)

    # ... and on 2 processes again: bitwise the run straight through
    proc = torchrun(tmp_path, "resumed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    for name, value in fsdp.items():
        assert torch.equal(resumed[name], value), name


def test_a_resume_that_would_change_the_global_batch_is_refused(tmp_path):
    """Another process count is fine when a step's samples stay the same; another global batch is not."""
    sft_trainer(tmp_path, 1, max_steps=3).fit()
    with pytest.raises(CheckpointError, match=r"data plan: the checkpoint.s samples_per_step is 8, this run.s 4"):
        sft_trainer(tmp_path, 2, max_steps=6).fit(resume="latest")  # one process of batch 4: half the step


def test_strategy_is_checked_and_what_fsdp_cannot_do_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="strategy: must be 'ddp' or 'fsdp', got 'zero3'"):
        SFTConfig(strategy="zero3")
    with pytest.raises(ConfigError, match="strategy: 'fsdp' with lora is not supported"):
        SFTTrainer(model(), SFTConfig(strategy="fsdp", lora={"r": 4}, output_dir=str(tmp_path)), tokenizer=tokenizer(),
                   train_data=sorting_examples(8))
    assert SFT_RUN["batch_size"] == 8

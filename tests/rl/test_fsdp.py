"""strategy="fsdp" (FSDP2) for RL on 2 CPU processes: token_mean's normalizer and batch_std's advantages span the
processes, so with sampling seeded per prompt 2 x 2 prompts end where 1 x 4 prompts end; and what FSDP cannot do
with RL is refused. SFT with FSDP (checkpoints, exact resume after SIGKILL): tests/lm/test_fsdp.py."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paperloop import ConfigError, RLConfig
from tests.support.rl import DDP_RUN, ExactRetry, LayoutFreeEpisodes, make_lm, make_rl_trainer, make_tokenizer
from tests.support.workers import run_worker

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_fsdp_matches_one_process_with_the_same_global_batch(tmp_path):
    run_worker(WORKER, "--out", tmp_path, processes=2, timeout=240)
    # RL (token_mean and batch_std across processes, sampling seeded per prompt): 2 x 2 prompts = 1 x 4
    rl = load_file(str(tmp_path / "rl.safetensors"))
    alone = make_rl_trainer(tmp_path / "rl_single", cls=LayoutFreeEpisodes, **DDP_RUN)
    alone.fit()
    moved = 0.0
    for name, value in alone.unwrapped_model.state_dict().items():
        torch.testing.assert_close(rl[name], value, rtol=0, atol=1e-5)
        moved = max(moved, (value - make_lm(make_tokenizer()).state_dict()[name]).abs().max().item())
    assert moved > 1e-3


def test_what_fsdp_cannot_do_with_rl_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="strategy: 'fsdp' with max_turns > 1 is not supported"):
        make_rl_trainer(tmp_path, env=ExactRetry, max_turns=2, strategy="fsdp")
    assert RLConfig(strategy="fsdp").strategy == "fsdp"

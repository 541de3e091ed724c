"""Two CPU processes (torchrun, gloo) end where one process with twice the batch ends, and a DDP run
stopped with a checkpoint and resumed ends bitwise where the uninterrupted DDP run ends."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.engine import ScheduledRegression, assert_bitwise_equal, make_data, make_model, weights
from tests.support.workers import run_worker
from paperloop import TrainerConfig
from paperloop.callbacks import LambdaCallback

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(out, *args):
    run_worker(WORKER, "--out", out, *args, processes=2)
    return load_file(str(out / "final.safetensors")), json.loads((out / "state.json").read_text())


def test_ddp_matches_one_process_with_double_batch_and_resumes_exactly(tmp_path):
    ddp_weights, ddp_state = torchrun(tmp_path / "ddp")
    assert ddp_state["world_size"] == 2 and ddp_state["global_step"] == 18

    cfg = TrainerConfig(max_epochs=3, batch_size=8, lr=0.01, output_dir=str(tmp_path / "single"))
    single = ScheduledRegression(make_model(dropout=0.0), cfg, train_data=make_data(48), val_data=make_data(20))
    single_state = single.fit()
    for k, v in weights(single.model).items():
        torch.testing.assert_close(ddp_weights[k], v, rtol=0, atol=1e-5)
    assert ddp_state["train_loss_history"] == pytest.approx(single_state.train_loss_history, rel=1e-5)
    assert [h["val/loss"] for h in ddp_state["val_history"]] == pytest.approx(
        [h["val/loss"] for h in single_state.val_history], rel=1e-5)

    # Stopped at step 8 (mid-epoch 2) with a checkpoint, then resumed by a fresh torchrun.
    _, stopped = torchrun(tmp_path / "resumed", "--stop-at", "8")
    assert stopped["global_step"] == 8 and stopped["stop_reason"] == "test preemption"
    resumed_weights, resumed_state = torchrun(tmp_path / "resumed", "--resume")
    assert_bitwise_equal(resumed_weights, ddp_weights)
    assert resumed_state["train_loss_history"] == ddp_state["train_loss_history"]
    assert resumed_state["global_step"] == 18


def test_ddp_weighted_steps_match_one_process_and_accumulation(tmp_path):
    """Unequal sample weights, plain SGD (which shows any error in the gradient's scale), 44 samples so
    each epoch ends on a short step: 2 processes of 4 = 1 process of 8 = 1 process of 2 x 4 micro-batches,
    in weights and in every step's logged loss."""
    from tests.support.engine import WeightedRegression, make_indexed_data

    ddp_weights, ddp_state = torchrun(tmp_path / "ddp", "--weighted")
    assert ddp_state["world_size"] == 2 and ddp_state["global_step"] == 12
    for batch_size, accum in ((8, 1), (2, 4)):
        losses = []
        spy = LambdaCallback(on_batch_end=lambda t, o: losses.append(float(o["train/loss"])))
        cfg = TrainerConfig(max_epochs=2, batch_size=batch_size, grad_accum_steps=accum, lr=0.05,
                            output_dir=str(tmp_path / f"single-{accum}"))
        single = WeightedRegression(make_model(dropout=0.0), cfg, train_data=make_indexed_data(44), callbacks=[spy])
        single.fit()
        for k, v in weights(single.model).items():
            torch.testing.assert_close(ddp_weights[k], v, rtol=0, atol=1e-6)
        assert ddp_state["step_losses"] == pytest.approx(losses, rel=1e-6)

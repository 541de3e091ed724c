"""The engine on one CUDA device (skipped without one; `benchmarks/gpu.sh` runs them on a GPU machine): bf16 autocast
training, the fused AdamW the trainer picks, an async checkpoint of CUDA tensors, and an exact resume.

Each check is a function of the device (`check_*`), so the same code can be run on the CPU by hand to see that it
holds together: `python -m tests.engine.test_cuda` (what the CPU can check of it; the tests themselves need CUDA)."""

import shutil

import pytest
import torch

import paperloop.checkpoint as ckpt
from tests.support.engine import (Regression, assert_bitwise_equal, make_data, make_model, make_resume_trainer,
                                  straight_and_resumed, weights)
from paperloop import TrainerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_bf16_autocast_trains(tmp_path, device: str):
    """precision="bf16": the model's linear layers compute in bfloat16 under autocast, the weights stay float32, and
    the loss falls."""
    seen = set()
    trainer = Regression(make_model(dropout=0.0), TrainerConfig(max_epochs=20, batch_size=8, lr=0.02, precision="bf16",
                                                               output_dir=str(tmp_path)), train_data=make_data(48))
    linear = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.add((out.device.type, out.dtype)))
    trainer.fit()
    assert seen == {(device, torch.bfloat16)}
    assert all(p.dtype == torch.float32 and p.device.type == device for p in trainer.model.parameters())
    losses = trainer.state.train_loss_history
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < 0.5 * losses[0]


class Float64Regression(Regression):
    def training_step(self, batch):
        x, y = batch
        return super().training_step((x.double(), y.double()))


def check_fused_adamw(tmp_path, device: str):
    """The default optimizer is AdamW with the fused kernel on the device, and its steps are AdamW's: three steps of
    the fused kernel land where three of the plain (for-each) one do, in float64 (bounded by the size of the update,
    not by one GPU's rounding)."""
    trainer = Float64Regression(make_model(dropout=0.0).double(), TrainerConfig(max_steps=3, batch_size=8, lr=0.01,
                                                                               output_dir=str(tmp_path)),
                                train_data=make_data(48))
    start = {name: p.detach().to(device, copy=True) for name, p in trainer.model.named_parameters()}
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["fused"] is True
    fused = weights(trainer.model)
    # the same three updates with the for-each kernel, on gradients recomputed from the same batches
    reference = make_model(dropout=0.0).double().to(device)
    reference.load_state_dict(start)
    plain = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.0, foreach=True)
    other = Float64Regression(reference, TrainerConfig(max_steps=3, batch_size=8, lr=0.01, output_dir=str(tmp_path / "b")),
                       train_data=make_data(48))
    other.configure_optimizer = lambda: plain
    other.fit()
    assert other.optimizer is plain
    for name, value in weights(other.model).items():
        moved = (value - start[name]).abs().max().item()
        assert (fused[name] - value).abs().max().item() <= 1e-9 * max(moved, 1e-3), name


def check_async_checkpoint(tmp_path, device: str):
    """An async save copies the CUDA tensors to CPU memory at the step boundary and writes them in a thread: the
    committed checkpoints' tensor files (weights; optimizer, RNG and the rest of the state) are, byte for byte, those
    a synchronous save writes. (The JSON files record the setting that differs, async_checkpoint.)"""
    digests = {}
    for mode in (False, True):
        trainer = make_resume_trainer(tmp_path / "run", async_checkpoint=mode)  # one folder: config.yaml names it
        trainer.state.run_id = "one-run"  # what a fresh fit draws at random
        trainer.fit()
        assert next(trainer.model.parameters()).device.type == device
        folder = tmp_path / "run" / "checkpoints"
        for path in ckpt.committed(folder):
            ckpt.verify(path)  # every file's size and sha256 against the manifest
        digests[mode] = {path.name: {name: entry["sha256"] for name, entry in ckpt.read_manifest(path).items()
                                     if name.endswith(".safetensors")} for path in ckpt.committed(folder)}
        shutil.move(tmp_path / "run", tmp_path / f"async-{mode}")
    assert digests[True] == digests[False] and len(digests[True]) == 3
    assert all(len(files) == 2 for files in digests[True].values())  # the weights, the state's tensors


def check_exact_resume(tmp_path, device: str):
    """Dropout (the device's generator), shuffled data, Adam and a schedule: stopped at step 7 and resumed from its
    checkpoint at step 6, the run lands bitwise on the straight run's weights and optimizer state."""
    straight, resumed = straight_and_resumed(lambda out, callbacks=(): make_resume_trainer(out, callbacks=callbacks),
                                             tmp_path, stop_at=7)
    assert next(resumed.model.parameters()).device.type == device
    assert_bitwise_equal(weights(straight.model), weights(resumed.model))
    assert straight.state.train_loss_history == resumed.state.train_loss_history
    for a, b in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert_bitwise_equal(a, b)


def test_bf16_autocast_trains_on_cuda(tmp_path):
    check_bf16_autocast_trains(tmp_path, "cuda")


def test_the_default_optimizer_is_fused_adamw_on_cuda_and_steps_as_adamw(tmp_path):
    check_fused_adamw(tmp_path, "cuda")


def test_an_async_checkpoint_of_cuda_tensors_is_the_synchronous_one(tmp_path):
    check_async_checkpoint(tmp_path, "cuda")


def test_exact_resume_on_cuda(tmp_path, monkeypatch):
    # cuBLAS picks among reduction orders unless told to keep to one (a resume must reproduce every update)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    check_exact_resume(tmp_path, "cuda")


if __name__ == "__main__":  # the CPU run of the same checks, by hand
    import tempfile
    from pathlib import Path

    torch.set_num_threads(1)
    for check in (check_bf16_autocast_trains, check_fused_adamw, check_async_checkpoint, check_exact_resume):
        with tempfile.TemporaryDirectory() as folder:
            check(Path(folder), "cuda" if torch.cuda.is_available() else "cpu")
            print(f"{check.__name__}: holds")

"""`async_checkpoint=True` writes the files a synchronous save writes for any model: frozen parameters and buffers
updated in place after each step (an EMA teacher, a target network) are copied at the step boundary like the rest,
even when the background write only runs once training has moved on. A trainer whose checkpoints leave frozen
parameters out (LoRA: the adapter alone) copies none, and a writer that reads one after all fails loudly."""

import copy
import hashlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import paperloop.checkpoint as ckpt
from tests.support.engine import make_data, make_model
from paperloop import BaseTrainer, CheckpointError, TrainerConfig
from paperloop.callbacks import LambdaCallback


class Student(torch.nn.Module):
    """A trained net and its EMA teacher: frozen parameters, and a buffer, that a step's end writes in place."""

    def __init__(self):
        super().__init__()
        self.net = make_model(dropout=0.0)
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def update_teacher(self):
        # .data writes bump no version counter: a copy can only be skipped by knowing nothing writes the tensor
        for t, s in zip(self.teacher.parameters(), self.net.parameters()):
            t.data.mul_(0.5).add_(s.data, alpha=0.5)
        self.ema_updates.add_(1)


class Distillation(BaseTrainer):
    """With `slow_disk`, writes each checkpoint's weights in the background only once training has updated the
    teacher for the next step (as a slow disk would let it), so the copy it writes must not share a tensor that
    step changes."""

    slow_disk = False

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.model.net(x), y) + 0.1 * F.mse_loss(self.model.net(x), self.model.teacher(x))

    def write_weights(self, model, directory, state_dict=None):
        step = int(re.search(r"step-(\d+)", directory.name)[1])
        in_writer = threading.current_thread() is not threading.main_thread()
        if self.slow_disk and in_writer and step < self.config.max_steps:
            deadline = time.monotonic() + 120  # a hang guard, not a speed bound
            while int(self.unwrapped_model.ema_updates) <= step:  # the training thread's teacher, updated in place
                assert time.monotonic() < deadline, f"training never updated the teacher after step {step}"
                time.sleep(0.005)
        super().write_weights(model, directory, state_dict)


def fit(out: Path, async_checkpoint: bool) -> Distillation:
    update = LambdaCallback(on_batch_end=lambda t, o: t.unwrapped_model.update_teacher())  # before the save
    config = TrainerConfig(max_steps=6, batch_size=8, lr=0.01, checkpoint_every_steps=1, output_dir=str(out),
                           async_checkpoint=async_checkpoint)
    t = Distillation(Student(), config, train_data=make_data(48), callbacks=[update])
    t.slow_disk = True
    t.state.run_id = "one-run"  # what a fresh fit draws at random: the same, so the files may be the same bytes
    t.fit()
    return t


def digests(checkpoint: Path) -> dict[str, str]:
    """sha256 of each file but the manifest, async_checkpoint taken out of the two files that record the config."""
    out = {}
    for path in sorted(checkpoint.iterdir()):
        data = path.read_bytes()
        if path.name == ckpt.MANIFEST:
            continue
        if path.name == ckpt.STATE_JSON:
            tree = json.loads(data)
            tree["config"].pop("async_checkpoint")
            data = json.dumps(tree).encode()
        if path.name == "config.yaml":
            data = re.sub(rb"async_checkpoint: (true|false)\n", b"", data)
        out[path.name] = hashlib.sha256(data).hexdigest()
    return out


def test_frozen_weights_updated_in_place_are_written_as_a_synchronous_save_writes_them(tmp_path):
    files = {}
    for mode in (False, True):
        fit(tmp_path / "run", mode)
        folder = tmp_path / "run" / "checkpoints"
        files[mode] = {p.name: digests(p) for p in ckpt.committed(folder)}
        shutil.move(tmp_path / "run", tmp_path / f"async-{mode}")
    assert len(files[True]) == 3  # the last three kept (ModelCheckpoint's default)
    assert files[True] == files[False]  # the teacher and its counter as they were at each step: byte for byte


def lora_trainer(out, **cfg):
    from tests.support.lm import make_trainer

    return make_trainer(out, n=32, max_epochs=None, max_steps=4, checkpoint_every_steps=2, lora={"r": 4}, **cfg)


def test_a_lora_trainer_copies_no_frozen_base_and_writes_the_same_adapter(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    written = []
    for mode in (False, True):
        t = lora_trainer(tmp_path / f"async-{mode}", async_checkpoint=mode)
        assert t.writes_frozen_weights is False
        if mode:  # the copy handed to the writer holds the adapters, and nothing of the frozen base
            real = ckpt.cpu_copy
            monkeypatch.setattr(ckpt, "cpu_copy", lambda m, **kw: written.append(real(m, **kw)) or written[-1])
        t.fit()
    copies = {n: p.device.type for n, p in written[0].named_parameters()}
    assert {d for n, d in copies.items() if "lora_" in n} == {"cpu"}
    assert {d for n, d in copies.items() if "lora_" not in n} == {"meta"}
    for name in ("step-000002", "step-000004"):
        adapter = [tmp_path / f"async-{mode}" / "checkpoints" / name / "adapter_model.safetensors" for mode in (False, True)]
        assert adapter[0].read_bytes() == adapter[1].read_bytes()


def test_a_writer_that_reads_a_frozen_parameter_it_said_it_does_not_write_fails_loudly(tmp_path):
    class Claims(Distillation):
        writes_frozen_weights = False  # wrong: the default writer writes the whole model

    t = Claims(Student(), TrainerConfig(max_steps=2, batch_size=8, checkpoint_every_steps=1, output_dir=str(tmp_path),
                                        async_checkpoint=True), train_data=make_data(16))
    with pytest.raises(CheckpointError, match=r"writing the checkpoint in the background failed \(RuntimeError: "
                                              r"Claims\.write_weights read a frozen parameter.*writes_frozen_weights"):
        t.fit()
    assert ckpt.committed(tmp_path / "checkpoints") == []  # nothing written from values of another step

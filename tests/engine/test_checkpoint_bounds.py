"""What a checkpoint says is data, bounded before it costs anything: a resume hashes only the files it reads (the
state's two and the weights), a manifest sealing more tensor bytes than the run's checkpoint can hold, a safetensors
file of another size than its header declares, or an oversized state JSON are refused before any hashing (a sparse
200 GB file stalled `resume="latest"` for ~20 minutes), and out-of-range counters or data positions are refused
naming the field, a plan's offset bounded by what the plan says it can hold."""

import hashlib
import json
import logging
import os
import re
import shutil

import pytest
import torch

import paperloop.checkpoint as ckpt
from tests.support.engine import make_resume_trainer
from paperloop import CheckpointError
from paperloop.plans import EpochPlan
from paperloop.rl.rollouts import WholeStepsPlan

HUGE = 200 << 30  # a sparse file: no disk, and minutes of sha256


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run's output folder: checkpoints step-000003 and step-000006."""
    out = tmp_path_factory.mktemp("finished")
    make_resume_trainer(out, max_epochs=1).fit()
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def seal(checkpoint, name, size=None):
    """Record `name` in the manifest as it is on disk, as an attacker who rewrites the manifest would (the digest of
    a sparse file is not worth computing: any will do, as long as nothing hashes it)."""
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    path = checkpoint / name
    size = path.stat().st_size if size is None else size
    small = not path.is_symlink() and size < 1 << 30
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if small else "0" * 64
    manifest["files"][name] = {"size": size, "sha256": digest}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def hashed(monkeypatch):
    names = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda path: names.append(path.name) or real(path))
    return names


def test_a_sparse_file_sealed_as_weights_is_refused_unhashed_and_latest_takes_the_older(run, hashed, caplog):
    newest, previous = ckpt.committed(run / "checkpoints")[:2]
    with open(newest / "extra.safetensors", "wb") as f:
        f.truncate(HUGE)
    manifest = seal(newest, "extra.safetensors")
    manifest["weights"].append("extra.safetensors")
    (newest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO):
        resumed = make_resume_trainer(run, max_epochs=2)
        resumed.fit(resume="latest")
    assert re.search(rf"skipped {re.escape(str(newest))}: .*manifest.json: seals 2147\d{{8}} bytes of tensors, more "
                     r"than a checkpoint of this run can hold", caplog.text)
    assert "extra.safetensors" not in hashed and resumed.state.global_step == 12  # from `previous` on
    assert f"resumed from {previous} at epoch 0, step 3" in caplog.text


def test_a_sparse_artifact_is_not_hashed_by_a_resume_which_never_reads_it(run, hashed):
    newest = ckpt.committed(run / "checkpoints")[0]
    with open(newest / "notes.txt", "wb") as f:
        f.truncate(HUGE)
    seal(newest, "notes.txt")
    resumed = make_resume_trainer(run, max_epochs=2)
    resumed.load_checkpoint("latest")
    assert resumed.state.global_step == 6 and "notes.txt" not in hashed
    assert sorted(set(hashed)) == [ckpt.WEIGHTS, ckpt.STATE_JSON, ckpt.STATE_TENSORS]


def test_a_safetensors_file_grown_past_what_its_header_declares_is_refused_before_hashing(run, hashed):
    newest = ckpt.committed(run / "checkpoints")[0]
    declared = (newest / ckpt.WEIGHTS).stat().st_size
    with open(newest / ckpt.WEIGHTS, "r+b") as f:
        f.truncate(HUGE)  # the real header and tensors, then a hole
    seal(newest, ckpt.WEIGHTS)
    with pytest.raises(CheckpointError, match=f"model.safetensors: {HUGE} bytes, but its safetensors header declares "
                                              f"{declared}"):
        ckpt.verify(newest)  # even with no limit: the whole check, as paperloop merge runs it
    assert hashed == []


def test_a_state_json_larger_than_a_state_is_refused_before_hashing(run, hashed):
    newest = ckpt.committed(run / "checkpoints")[0]
    with open(newest / ckpt.STATE_JSON, "r+b") as f:
        f.truncate(ckpt.METADATA_LIMIT + 1)
    seal(newest, ckpt.STATE_JSON)
    with pytest.raises(CheckpointError, match=f"trainer_state.json: {ckpt.METADATA_LIMIT + 1} bytes, more than a "
                                              "checkpoint writes there"):
        make_resume_trainer(run).load_checkpoint(newest)
    assert hashed == []


def test_a_link_is_refused_and_weights_must_be_safetensors(run):
    newest, previous = ckpt.committed(run / "checkpoints")[:2]
    os.symlink("/dev/zero", newest / "zeros.txt")
    seal(newest, "zeros.txt", size=0)
    with pytest.raises(CheckpointError, match="zeros.txt: not a regular file"):
        ckpt.verify(newest)
    (previous / "weights.bin").write_bytes(b"not a tensor file")
    manifest = seal(previous, "weights.bin")
    manifest["weights"] = ["weights.bin"]
    (previous / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'weights' names a file that is not a safetensors file of weights"):
        ckpt.verify(previous)


def test_an_index_left_beside_a_checkpoint_unsealed_is_not_read(run):
    newest = ckpt.committed(run / "checkpoints")[0]
    (newest / ckpt.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": {"x": "other.safetensors"}}))
    assert ckpt.weight_files(newest) == [ckpt.WEIGHTS]  # what the manifest records, not the stray index
    seal(newest, ckpt.WEIGHTS_INDEX)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: names other.safetensors, which .* does "
                                              "not seal"):
        ckpt.weight_files(newest)


def rewrite_state(checkpoint, edit):
    tree = json.loads((checkpoint / ckpt.STATE_JSON).read_text())
    edit(tree)
    (checkpoint / ckpt.STATE_JSON).write_text(json.dumps(tree))
    seal(checkpoint, ckpt.STATE_JSON)


@pytest.mark.parametrize("field, value, message", [
    ("global_step", -5, r"TrainState: global_step is -5, not a count"),
    ("updates", 2.5, r"TrainState: updates is 2.5, not a count"),
    ("epoch", 10**12, r"TrainState: epoch is 1000000000000, more than the 6 steps the run took"),
    ("step_in_epoch", 7, r"TrainState: step_in_epoch is 7, more than the 6 steps"),
    ("should_stop", "no", r"TrainState: should_stop is a str"),
])
def test_out_of_range_counters_are_refused_naming_the_field(run, field, value, message):
    newest = ckpt.committed(run / "checkpoints")[0]
    rewrite_state(newest, lambda tree: tree["train_state"].update({field: value}))
    with pytest.raises(CheckpointError, match=f"^{newest / ckpt.STATE_JSON}: {message}"):
        make_resume_trainer(run).load_checkpoint(newest)


@pytest.mark.parametrize("data, message", [
    ({"offset": 10**9}, r"data plan: the checkpoint's offset is 1000000000, outside the 0 \.\. 6 steps"),
    ({"offset": -1}, r"data plan: the checkpoint's offset is -1, outside"),
    ({"epoch": 10**12}, r"data plan: the checkpoint's data position is in epoch 1000000000000, its train_state in "
                        r"epoch 1"),
])
def test_a_data_position_outside_its_plan_is_refused(run, data, message):
    newest = ckpt.committed(run / "checkpoints")[0]
    rewrite_state(newest, lambda tree: tree["data"].update(data))
    trainer = make_resume_trainer(run)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"^{newest / ckpt.STATE_JSON}: {message}"):
        trainer.load_checkpoint(newest)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())  # nothing loaded
    assert trainer.state.global_step == 0 and (trainer.plan is None or (trainer.plan.epoch, trainer.plan.offset) == (0, 0))


def test_each_plan_takes_back_the_furthest_position_it_can_reach_and_no_further():
    plan = EpochPlan(48, 8)  # 6 steps an epoch
    plan.load_state_dict({**plan.state_dict(), "offset": 6})  # every step taken, the epoch not yet closed
    with pytest.raises(ValueError, match=r"offset is 7, outside the 0 \.\. 6 steps"):
        plan.load_state_dict({**plan.state_dict(), "offset": 7})

    # Dynamic sampling: a step draws on into the next epoch, all of its steps but the last
    plan = WholeStepsPlan(16, 4)  # 4 steps an epoch
    next(plan.steps())
    while plan.draw_extra() is not None:
        pass
    plan.advance()
    assert plan.offset == 2 * plan.steps_per_epoch() - 1 == plan.offset_limit(0)
    WholeStepsPlan(16, 4).load_state_dict(plan.state_dict())
    with pytest.raises(ValueError, match=r"offset is 8, outside the 0 \.\. 7 steps"):
        WholeStepsPlan(16, 4).load_state_dict({**plan.state_dict(), "offset": 8})

"""A trainer owns how its weights are written and read (`write_weights`, `load_weights`): a writer of its own gets
its files into every checkpoint, sealed in the manifest, written the same in the background, and read back for its
`load_weights`; the manifest records which files hold the weights, and never names one outside the checkpoint."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import paperloop.checkpoint as ckpt
from tests.support.engine import ScheduledRegression, assert_bitwise_equal, make_resume_trainer, weights
from paperloop import CheckpointError
from paperloop.callbacks import LambdaCallback

OWN = "net/params.safetensors"  # a writer's own file, in a folder of its own


class OwnFormat(ScheduledRegression):
    """Weights under names of its own ("net:<key>"), in a file of its own; `loaded` keeps what it was given."""

    def write_weights(self, model, directory, state_dict=None):
        (directory / "net").mkdir()
        save_file({f"net:{k}": v.contiguous() for k, v in model.state_dict().items()}, str(directory / OWN))

    def load_weights(self, tensors):
        self.loaded = dict(tensors)
        self.unwrapped_model.load_state_dict({k.removeprefix("net:"): v for k, v in tensors.items()})


def own_trainer(out, callbacks=(), **overrides) -> OwnFormat:
    return make_resume_trainer(out, callbacks=callbacks, cls=OwnFormat, **overrides)


def test_a_weights_writer_of_its_own_is_sealed_in_the_manifest_and_read_back(tmp_path):
    straight = own_trainer(tmp_path / "straight")
    straight.fit()
    checkpoint = ckpt.committed(tmp_path / "straight" / "checkpoints")[0]
    assert not (checkpoint / ckpt.WEIGHTS).exists()
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    assert manifest["weights"] == [OWN] and OWN in manifest["files"]  # sealed: its size and sha256
    written = load_file(str(checkpoint / OWN))
    assert_bitwise_equal(written, {f"net:{k}": v for k, v in weights(straight.model).items()})

    preempted = LambdaCallback(on_batch_end=lambda t, o: t.state.global_step == 9
                               and t.request_stop("preempted", resumable=True))
    own_trainer(tmp_path / "resumed", [preempted]).fit()
    at_step_9 = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-000009" / OWN))
    resumed = own_trainer(tmp_path / "resumed")
    resumed.fit(resume="latest")
    assert_bitwise_equal(resumed.loaded, at_step_9)  # what the writer wrote, as it wrote it
    assert_bitwise_equal(weights(resumed.model), weights(straight.model))

    (checkpoint / OWN).write_bytes(b"0" * (checkpoint / OWN).stat().st_size)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(checkpoint / OWN))}: sha256 differs"):
        own_trainer(tmp_path / "other").load_checkpoint(checkpoint)


def test_an_async_save_writes_with_the_same_writer_the_same_bytes(tmp_path):
    files = {}
    for mode in (False, True):
        t = own_trainer(tmp_path / f"async-{mode}", async_checkpoint=mode)
        t.state.run_id = "one-run"
        t.fit()
        files[mode] = {p.name: (p / OWN).read_bytes() for p in ckpt.committed(t.checkpoint_dir)}
    assert list(files[True]) == ["step-000024", "step-000021", "step-000018"]
    assert files[True] == files[False]


def test_safetensors_artifacts_are_not_read_as_weights(tmp_path):
    """Only what the weights writer wrote is weights: a tokenizer-like artifact in safetensors stays an artifact."""

    class WithArtifact(ScheduledRegression):
        def write_artifacts(self, directory):
            save_file({"table": torch.ones(3)}, str(directory / "lookup.safetensors"))

    make_resume_trainer(tmp_path, max_epochs=1, cls=WithArtifact).fit()
    checkpoint = ckpt.committed(tmp_path / "checkpoints")[0]
    assert json.loads((checkpoint / ckpt.MANIFEST).read_text())["weights"] == [ckpt.WEIGHTS]
    make_resume_trainer(tmp_path, max_epochs=2, cls=WithArtifact).fit(resume=checkpoint)


def rewrite_manifest(checkpoint, edit):
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    edit(manifest)
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_written_before_the_record_reads_every_sealed_safetensors_but_the_state(tmp_path):
    straight = own_trainer(tmp_path / "straight", max_epochs=1)
    straight.fit()
    checkpoint = ckpt.committed(tmp_path / "straight" / "checkpoints")[0]
    rewrite_manifest(checkpoint, lambda m: m.pop("weights"))
    resumed = own_trainer(tmp_path / "resumed", max_epochs=1)
    resumed.load_checkpoint(checkpoint)
    assert_bitwise_equal(weights(resumed.model), weights(straight.model))


@pytest.mark.parametrize("crafted", ["../../victim.safetensors", "/etc/victim.safetensors", "elsewhere.safetensors",
                                     "net", 7])
def test_a_weights_record_names_only_files_the_manifest_seals(tmp_path, crafted):
    make_resume_trainer(tmp_path, max_epochs=1).fit()
    checkpoint = ckpt.committed(tmp_path / "checkpoints")[0]
    rewrite_manifest(checkpoint, lambda m: m["weights"].append(crafted))
    with pytest.raises(CheckpointError, match=r"not a valid paperloop-checkpoint/1 manifest: 'weights' is not a list "
                                              r"of names from 'files'"):
        ckpt.read(checkpoint)

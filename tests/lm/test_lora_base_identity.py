"""A LoRA base is known by its content, not its path: every LoRA checkpoint records a checksum of the base's weights
(with their dtype), a resume onto a base folder that now holds other weights is refused naming the folder, and
`paperloop merge` refuses to merge onto a base that is not the one the adapter was trained on (loading the base in
the dtype the run trained it in, so a base cast on load still merges)."""

import json
import shutil

import pytest
import torch

import paperloop.checkpoint as ckpt
from paperloop import CheckpointError, SFTConfig, SFTTrainer
from tests.support.lm import model, sorting_examples, tokenizer

peft = pytest.importorskip("peft")

from paperloop.lm.lora import LORA_BASE, base_fingerprint, merge_checkpoint  # noqa: E402  (needs peft's extra)


def from_folder(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def lora_run(out, base, **cfg):
    settings = {**dict(max_length=24, batch_size=8, max_epochs=None, max_steps=4, lr=1e-2, checkpoint_every_steps=2,
                       lora={"r": 4}, output_dir=str(out)), **cfg}
    return SFTTrainer(from_folder(base), SFTConfig(**settings), tokenizer=tokenizer(), train_data=sorting_examples(32))


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    model(seed=0).save_pretrained(folder)
    return folder


def replace_base(folder):
    """Another model's weights in the same folder, as when a path is reused for a newer download."""
    shutil.rmtree(folder)
    model(seed=1).save_pretrained(folder)


def test_each_lora_checkpoint_records_its_base_and_a_resume_onto_other_weights_is_refused(tmp_path, base):
    lora_run(tmp_path / "run", base, max_steps=2).fit()
    checkpoint = ckpt.committed(tmp_path / "run" / "checkpoints")[0]
    recorded = json.loads((checkpoint / ckpt.STATE_JSON).read_text())["fingerprints"][LORA_BASE]
    assert recorded == base_fingerprint(from_folder(base).state_dict(), torch.float32)
    assert recorded.startswith("float32:")

    replace_base(base)
    with pytest.raises(CheckpointError, match=rf"trainer_state.json: lora base model: {base} does not hold the weights "
                                              r"this run's adapters were trained on \(their checksum differs"):
        lora_run(tmp_path / "run", base).fit(resume="latest")


def test_the_same_base_resumes(tmp_path, base):
    lora_run(tmp_path / "run", base, max_steps=2).fit()
    assert lora_run(tmp_path / "run", base).fit(resume="latest").global_step == 4


def test_merge_refuses_a_base_folder_that_now_holds_other_weights(tmp_path, base):
    lora_run(tmp_path / "run", base).fit()
    checkpoint = ckpt.committed(tmp_path / "run" / "checkpoints")[0]
    kept = tmp_path / "original-base"
    shutil.copytree(base, kept)
    replace_base(base)  # the folder adapter_config.json names (an absolute path) now holds another model
    with pytest.raises(CheckpointError, match=rf"{base}: does not hold the base model the adapter in {checkpoint} was "
                                              r"trained on \(the checksum of its weights differs"):
        merge_checkpoint(checkpoint, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    merge_checkpoint(checkpoint, tmp_path / "merged", base=kept)  # the base it was trained on
    assert (tmp_path / "merged" / "config.json").is_file()


def test_a_base_cast_on_load_is_merged_in_the_dtype_it_was_trained_in(tmp_path, base):
    cast = from_folder(base, dtype=torch.bfloat16)  # a float32 folder loaded in bfloat16, as a user may
    digest = base_fingerprint(cast.state_dict(), torch.bfloat16)
    assert digest.startswith("bfloat16:")
    assert digest == base_fingerprint(from_folder(base, dtype=torch.bfloat16).state_dict(), torch.bfloat16)
    assert digest != base_fingerprint(from_folder(base).state_dict(), torch.float32)

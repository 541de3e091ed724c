"""`paperloop merge` against a hostile checkpoint folder and a careless OUT: no code shipped in a checkpoint (or in
the base it names) runs and nothing is asked on the terminal; module patterns in adapter_config.json are never
run as regular expressions; OUT is never the checkpoint, the base, a file or a folder of the user's files; success
is reported only after the written weights are read back."""

import json
import sys

import pytest
import torch

import paperloop.checkpoint as ckpt
from paperloop.cli import main as cli
from paperloop.lm.weights import ADAPTER_WEIGHTS

peft = pytest.importorskip("peft")

from tests.lm.test_sft_extras import lora_trainer  # noqa: E402  (after the skip: it needs peft)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished LoRA run (base built in memory, so written to output_dir/base_model) and its last checkpoint."""
    out = tmp_path_factory.mktemp("lora")
    trainer = lora_trainer(out, lora={"r": 4, "alpha": 12})
    trainer.fit()
    return trainer, ckpt.committed(out / "checkpoints")[0]


def tampered(checkpoint, tmp_path, name, edit):
    """A copy of the checkpoint with one file edited and the manifest rewritten to match, as an attacker would."""
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(checkpoint, copy)
    path = copy / name
    path.write_text(edit(path.read_text()))
    manifest = json.loads((copy / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"size": path.stat().st_size, "sha256": ckpt._sha256(path)}
    (copy / ckpt.MANIFEST).write_text(json.dumps(manifest))
    return copy


def merged_logits(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 6, 7]])).logits


def add_file(folder, name, text):
    (folder / name).write_text(text)
    manifest_path = folder / ckpt.MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": ckpt._sha256(folder / name)}
        manifest_path.write_text(json.dumps(manifest))


EVIL = "open({marker!r}, 'w').write('ran')\nfrom transformers import {base}\nclass Evil({base}): pass\n"


def test_merge_runs_no_code_from_the_checkpoint_or_its_base_and_asks_nothing(run, tmp_path, monkeypatch, capsys):
    """A tokenizer_config.json (in the checkpoint) or a config.json (in the base) with an `auto_map` naming a .py
    beside it: transformers would ask "Do you wish to run the custom code? [y/N]", and a `y` runs it."""
    import shutil

    trainer, checkpoint = run
    marker = tmp_path / "code-ran"
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a user who says yes
    evil = tampered(checkpoint, tmp_path, "tokenizer_config.json", lambda text: json.dumps(
        {**json.loads(text), "tokenizer_class": "Evil", "auto_map": {"AutoTokenizer": ["evil.Evil", "evil.Evil"]}}))
    add_file(evil, "evil.py", EVIL.format(marker=str(marker), base="PreTrainedTokenizerFast"))
    assert cli(["merge", str(evil), str(tmp_path / "merged")]) == 2
    assert "without running their own code" in capsys.readouterr().err
    evil_base = tmp_path / "evil-base"
    shutil.copytree(checkpoint.parents[1] / "base_model", evil_base)
    config = json.loads((evil_base / "config.json").read_text())
    add_file(evil_base, "config.json", json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Evil"}}))
    add_file(evil_base, "evil.py", EVIL.format(marker=str(marker), base="LlamaForCausalLM"))
    code = cli(["merge", str(checkpoint), str(tmp_path / "merged"), "--base", str(evil_base)])
    assert not marker.exists() and asked == []  # the shipped code never ran, and nothing was asked
    if code == 0:  # transformers took the plain class the config also names: then the merge is the right one
        torch.testing.assert_close(merged_logits(tmp_path / "merged"), merged_logits_of(trainer), rtol=0, atol=1e-5)
    assert "loading the base model from" in capsys.readouterr().err  # says which base, and why that one


def merged_logits_of(trainer):
    with torch.no_grad():
        return trainer.unwrapped_model(torch.tensor([[1, 5, 6, 7]])).logits


def test_module_patterns_in_adapter_config_are_never_run_and_the_run_settings_decide(run, tmp_path):
    trainer, checkpoint = run
    # A pattern that backtracks for ever if peft ever ran it as a regular expression; and a wrong alpha.
    hostile = tampered(checkpoint, tmp_path, "adapter_config.json", lambda text: json.dumps(
        {**json.loads(text), "target_modules": "(.*.*)*X", "lora_alpha": 1000}))
    assert cli(["merge", str(hostile), str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(merged_logits(tmp_path / "merged"), merged_logits_of(trainer), rtol=0, atol=1e-5)


def test_the_merged_update_is_scaled_by_the_runs_alpha_over_r(run, tmp_path):
    """alpha 12, r 4 (not peft's default 8): the merged weight is W + (12 / 4) B A."""
    trainer, checkpoint = run
    assert cli(["merge", str(checkpoint), str(tmp_path / "merged")]) == 0
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    state = trainer.unwrapped_model.state_dict()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
    expected = state[f"{prefix}.base_layer.weight"] + (12 / 4) * b @ a
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    assert trainer.unwrapped_model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 3.0


def test_out_is_never_the_checkpoint_the_base_a_file_or_a_folder_of_files(run, tmp_path, capsys):
    trainer, checkpoint = run
    base = checkpoint.parents[1] / "base_model"
    before = {p: p.read_bytes() for folder in (checkpoint, base) for p in folder.iterdir() if p.is_file()}
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "thesis.tex").write_text("mine")
    for out, words in ((checkpoint, "the checkpoint"), (base, "the adapter's base model"),
                       (checkpoint.parent, "the checkpoint"), (user_file, "not a folder"),
                       (user_folder, "files in it")):
        capsys.readouterr()
        assert cli(["merge", str(checkpoint), str(out)]) == 2, out
        assert words in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before  # the checkpoint and the base are untouched
    assert user_file.read_text() == "mine" and (user_folder / "thesis.tex").read_text() == "mine"
    ckpt.verify(checkpoint)  # it still verifies, so `resume="latest"` still takes it
    assert cli(["merge", str(checkpoint), str(user_folder), "--force"]) == 0  # asked for: replaced
    assert not (user_folder / "thesis.tex").exists() and (user_folder / "config.json").is_file()
    assert "read back and checked" in capsys.readouterr().out


def test_settings_that_are_not_lora_settings_are_refused_by_name():
    from paperloop import ConfigError, SFTConfig

    for lora, key in (({"alpha": float("nan")}, "lora.alpha"), ({"r": 2.5}, "lora.r"), ({"r": "8"}, "lora.r"),
                      ({"target_modules": "q_proj"}, "lora.target_modules"),
                      ({"target_modules": ["(.*)*X"]}, "lora.target_modules"), ({"rank": 8}, "lora.rank"),
                      ({"alpha": 0}, "lora.alpha")):
        with pytest.raises(ConfigError, match=f"^{key}"):
            SFTConfig(lora=lora)


def test_a_truncated_adapter_is_a_one_line_error(run, tmp_path, capsys):
    import shutil

    trainer, checkpoint = run
    copy = tmp_path / "truncated"
    shutil.copytree(checkpoint, copy)
    adapter = copy / ADAPTER_WEIGHTS
    adapter.write_bytes(adapter.read_bytes()[:200])
    add_file_bytes(copy, ADAPTER_WEIGHTS)  # the manifest rewritten to match: only parsing can tell
    assert cli(["merge", str(copy), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"paperloop: error: {adapter}: not a valid safetensors file")
    assert not (tmp_path / "merged").exists()


def add_file_bytes(folder, name):
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": ckpt._sha256(folder / name)}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))

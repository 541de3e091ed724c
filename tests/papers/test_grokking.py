"""The Grokking reproduction: the equation table and split, the answer-only mask, and a miniature end-to-end run
through `paperloop run grokking` writing the results the README promises."""

import json

import pytest
import torch

from paperloop import ConfigError, load_config
from paperloop.cli import main as cli
from paperloop.lm.data import tokenize_examples
from paperloop.papers import grokking
from paperloop.papers.grokking import data
from paperloop.papers.grokking.trainer import without_eos


def test_equations_and_split_by_hand():
    adds = data.equations(5, "add")
    assert len(adds) == 25 and adds[5 * 3 + 4] == {"prompt": "3 + 4 =", "completion": " 2"}
    assert data.equations(5, "subtract")[5 * 1 + 3]["completion"] == " 3"  # 1 - 3 = -2 = 3 (mod 5)
    divides = data.equations(5, "divide")
    assert len(divides) == 20 and all(not e["prompt"].endswith(" 0 =") for e in divides)
    assert {"prompt": "3 / 4 =", "completion": " 2"} in divides  # 4 * 2 = 8 = 3 (mod 5)
    train, val = data.split(adds, 0.4, seed=0)
    assert len(train) == 10 and len(val) == 15
    assert sorted(map(str, train + val)) == sorted(map(str, adds))
    assert data.split(adds, 0.4, seed=0) == (train, val)


def test_only_the_answer_is_trained_and_the_end_position_is_dropped():
    tok = data.tokenizer(97)
    (example,), _ = tokenize_examples([{"prompt": "28 + 57 =", "completion": " 85"}], tok, 8)
    short = without_eos(example)
    assert tok.convert_ids_to_tokens(short.input_ids.tolist()) == ["<bos>", "28", "+", "57", "="]
    assert tok.convert_ids_to_tokens(short.target_tokens[short.weights > 0].tolist()) == ["85"]
    assert torch.equal(short.weights, torch.tensor([0.0, 0, 0, 0, 1]))


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="operation"):
        load_config(grokking.Config, None, ["operation=multiply"])
    with pytest.raises(ConfigError, match="modulus"):
        load_config(grokking.Config, None, ["operation=divide", "modulus=96"])
    with pytest.raises(ConfigError, match="train_fraction"):
        load_config(grokking.Config, None, ["train_fraction=1.0"])


def test_a_miniature_run_writes_results_table_and_figure(tmp_path, capsys):
    args = ["run", "grokking", f"output_dir={tmp_path}", "modulus=11", "train_fraction=0.5", "hidden_size=32",
            "batch_size=32", "max_steps=40", "val_every=1", "weight_decays=[1.0,0.0]", "lr=0.01"]
    assert cli(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["weight_decay"] for r in rows] == [1.0, 0.0]
    for r in rows:
        assert set(r) >= {"weight_decay", "train_acc_99_step", "val_acc_99_step", "final_val_acc", "curve"}
        assert r["steps"] <= 40 and r["curve"][-1][0] == r["steps"]
        if r["val_acc_99_step"] is not None:  # it stopped at the threshold
            assert r["final_val_acc"] >= 99 and r["steps"] == r["val_acc_99_step"]
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "| weight decay |" in (tmp_path / "results.md").read_text()


def test_a_short_run_still_writes_results_and_changed_settings_or_overrides_are_refused(tmp_path, capsys):
    """`max_steps=10` (shorter than val_every: no validation ran) is the obvious smoke test and must write its
    results; running again with another data_seed must not resume the finished runs into a mixed curve; a
    weight_decay override, which weight_decays replaces, is refused naming the key to use."""
    args = ["run", "grokking", f"output_dir={tmp_path}", "modulus=11", "hidden_size=16", "batch_size=32",
            "max_steps=3", "weight_decays=[1.0]"]
    assert cli(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"][0]["steps"] == 3 and result["rows"][0]["curve"][-1][0] == 3
    assert result["setup"]["settings"]["data_seed"] == 0
    capsys.readouterr()
    assert cli(args + ["data_seed=1"]) == 2
    assert "config: data_seed is 0 in the checkpoint but 1 in this run" in capsys.readouterr().err
    assert cli(args + ["weight_decay=0.5"]) == 2
    assert "weight_decay: grokking trains one run per value of weight_decays" in capsys.readouterr().err
    assert cli(args + ["weight_decays=[1.0,0.0]"]) == 0  # another run added: the finished one is reused as it is

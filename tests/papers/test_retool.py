"""papers/retool: the calculator task (tags as whole tokens, demonstrations whose tool results are never trained,
the episode), and a tiny end-to-end run of `paperloop run retool` whose second run reuses the stages done."""

import json

from paperloop.lm import tokenize_examples
from paperloop.papers.retool.task import (calculator_env, make_tokenizer, rl_examples, sft_examples, split_problems,
                                          stop_token_ids)


def test_a_call_is_ten_tokens_and_ends_an_action():
    tok = make_tokenizer()
    ids = tok("<call>mul(37,48)</call>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10 and tok.unk_token_id not in ids
    assert ids[-1] in stop_token_ids(tok) and tok.eos_token_id in stop_token_ids(tok)
    train, held_out = split_problems(200, seed=0)
    assert len(train) == 7900 and not set(train) & set(held_out)


def test_demonstrations_train_the_call_and_the_answer_never_the_tools_result():
    tok = make_tokenizer()
    examples = sft_examples([(37, 48)] * 40, tool_share=0.5, seed=0)
    with_tool = [e for e in examples if "<result>" in e["prompt"]]
    assert with_tool and len(examples) == 40 + len(with_tool)  # a demonstration with the tool is two examples
    assert {"prompt": "37*48=", "completion": "<call>mul(37,48)</call>"} in examples
    tokenized, _ = tokenize_examples(with_tool[:1], tok, max_length=40)
    trained = tok.decode(tokenized[0].target_tokens[tokenized[0].weights > 0])
    assert trained == "1776<eos>"  # the answer after the result; the result itself is the tool's
    assert all("<call>" not in e["completion"] for e in sft_examples([(37, 48)] * 20, tool_share=0.0, seed=0))


def test_the_calculator_answers_a_call_and_scores_the_answer():
    env = calculator_env()(rl_examples([(37, 48)])[0])
    assert env.reset(0) == "37*48="
    assert env.step("<call>mul(37,48)</call>").observation == "<result>1776</result>"
    final = env.step("1776")
    assert final.done and final.reward == 1.0 and final.metrics["used_tools"] == 1.0


def test_tiny_end_to_end_run_writes_results_and_a_second_run_reuses_the_stages(tmp_path):
    from paperloop import load_config
    from paperloop.papers import config_path, load

    module = load("retool")
    overrides = [f"output_dir={tmp_path}", "hidden_size=32", "num_layers=1", "held_out=8", "sft_steps=10",
                 "sft_batch_size=32", "max_steps=2", "batch_size=4", "num_generations=4", "eval_samples=2",
                 "checkpoint_every_steps=1", "log_every_steps=1"]
    cfg = load_config(module.Config, config_path("retool"), overrides)
    module.run(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["sft_tool", "rl_tool", "sft_text", "rl_text"]
    for row in result["rows"]:
        assert 0 <= row["greedy_acc"] <= 1 and 0 <= row["tool_rate"] <= 1 and 1 <= row["turns_mean"] <= 3
    assert [len(result["curves"][k]) for k in ("tool_seed0", "text_seed0")] == [2, 2]
    table = (tmp_path / "results.md").read_text()
    assert "| RL with the tool (ReTool) |" in table and (tmp_path / "results.png").stat().st_size > 10_000
    weights = tmp_path / "seed0" / "rl_tool" / "model" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    module.run(cfg)  # every stage is done: loaded, not trained again; the same evaluation
    assert weights.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]

"""papers/rlvr: the task split and reward, the coverage count, the results files, and a tiny end-to-end run of
`paperloop run rlvr` (SFT, GRPO, Dr. GRPO, pass@k) whose second run reuses the stages already done."""

import json

import pytest

from paperloop.papers.rlvr.evaluate import coverage, write_results
from paperloop.papers.rlvr.task import correct, rl_prompts, sft_examples, split_problems


def test_held_out_pairs_are_disjoint_from_training_pairs_and_fixed_by_the_seed():
    train, held_out = split_problems(200, seed=0)
    assert len(train) == 7900 and len(held_out) == 200 and not set(train) & set(held_out)
    assert split_problems(200, seed=0) == (train, held_out) and split_problems(200, seed=1)[1] != held_out
    assert sft_examples([(12, 7)]) == [{"prompt": "12+7=", "completion": "19"}]
    assert rl_prompts([(99, 99)]) == [{"prompt": "99+99=", "answer": "198"}]
    assert correct("12+7=", "19", {"answer": "19"}) == 1.0
    assert correct("12+7=", "190", {"answer": "19"}) == 0.0 and correct("12+7=", "", {"answer": "19"}) == 0.0


def test_coverage_counts_pairs_solved_by_one_model_and_not_the_other():
    rows = [{"method": "sft", "solved": [True, True, False, False, True]},
            {"method": "grpo", "solved": [True, False, True, False, True]}]
    assert coverage(rows) == {"grpo": {"only_rl": 1, "only_sft": 1, "both": 2, "pairs": 5}}


def test_results_files(tmp_path):
    rows = [{"method": m, "pass_at": {"1": p1, "2": 0.5, "4": 0.75}, "greedy_acc": p1, "mean_completion_len": 3.5,
             "train_seconds": 10.0, "solved": [True, False]} for m, p1 in (("sft", 0.25), ("grpo", 0.5))]
    write_results(tmp_path, "paper", rows, {"held_out": 2, "eval_samples": 4, "eval_temperature": 1.0,
                                             "seconds": {"total": 20.0}})
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["sft", "grpo"] and "solved" not in result["rows"][0]
    assert result["rows"][1]["pass_at"] == {"1": 0.5, "2": 0.5, "4": 0.75}
    table = (tmp_path / "results.md").read_text()
    assert "| grpo | 50.0% | 50.0% | 75.0% | 3.50 | 10 |" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_the_shipped_config_loads_and_the_paper_is_listed(capsys):
    from paperloop import ConfigError, load_config
    from paperloop.cli import main
    from paperloop.papers import config_path, load

    module = load("rlvr")
    cfg = load_config(module.Config, config_path("rlvr"))
    assert (cfg.methods, cfg.eval_samples, cfg.max_steps, cfg.sft_steps) == (("grpo", "dr_grpo"), 256, 600, 300)
    with pytest.raises(ConfigError, match="^methods"):
        load_config(module.Config, config_path("rlvr"), ["methods=[ppo]"])
    with pytest.raises(ConfigError, match="^eval_samples"):
        load_config(module.Config, config_path("rlvr"), ["eval_samples=100"])
    assert main(["list"]) == 0 and "rlvr" in capsys.readouterr().out


def test_tiny_end_to_end_run_writes_results_and_a_second_run_reuses_the_stages(tmp_path):
    from paperloop import load_config
    from paperloop.papers import config_path, load

    module = load("rlvr")
    overrides = [f"output_dir={tmp_path}", "hidden_size=32", "num_layers=1", "held_out=16", "sft_steps=15",
                 "sft_batch_size=32", "max_steps=3", "batch_size=4", "num_generations=4", "eval_samples=8",
                 "checkpoint_every_steps=2", "log_every_steps=1"]
    cfg = load_config(module.Config, config_path("rlvr"), overrides)
    module.run(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["sft", "grpo", "dr_grpo"]
    for row in result["rows"]:
        assert list(row["pass_at"]) == ["1", "2", "4", "8"]
        values = list(row["pass_at"].values())
        assert values == sorted(values) and 0 <= values[0] and values[-1] <= 1  # pass@k grows with k
        assert 1 <= row["mean_completion_len"] <= cfg.max_new_tokens
    assert set(result["coverage"]) == {"grpo", "dr_grpo"} and result["coverage"]["grpo"]["pairs"] == 16
    for stage in ("sft", "grpo", "dr_grpo"):
        assert (tmp_path / stage / "model" / "config.json").exists()
    assert (tmp_path / "results.png").exists() and "| grpo |" in (tmp_path / "results.md").read_text()
    weights = tmp_path / "grpo" / "model" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    module.run(cfg)  # every stage is done: loaded, not trained again; the same evaluation
    assert weights.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]


def test_a_finished_stage_is_never_reused_with_other_settings_and_thrown_away_overrides_are_refused(tmp_path):
    """Another width, SFT length, lr or held-out split must not silently reuse the finished SFT model (with another
    data_seed, pass@k would be measured on training pairs); advantage/aggregation overrides, which `methods`
    replaces, are refused naming the key to use."""
    from paperloop import ConfigError, load_config
    from paperloop.papers import config_path, load

    module = load("rlvr")
    base = [f"output_dir={tmp_path}", "hidden_size=16", "num_layers=1", "held_out=16", "sft_steps=3",
            "sft_batch_size=16", "max_steps=1", "batch_size=4", "num_generations=2", "eval_samples=2",
            "methods=[grpo]"]
    module.run(load_config(module.Config, config_path("rlvr"), base))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["settings"]["data_seed"] == 0 and result["settings"]["sft_steps"] == 3  # recorded
    for override in ("data_seed=1", "hidden_size=24", "sft_lr=0.01", "sft_steps=4"):
        with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}: the finished sft stage"):
            module.run(load_config(module.Config, config_path("rlvr"), base + [override]))
    for override in ("lr=0.5", "max_steps=2"):  # a 1-step stage is not the 2-step one
        with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}: the finished grpo stage"):
            module.run(load_config(module.Config, config_path("rlvr"), base + [override]))
    for override in ("advantage=none", "aggregation=token_mean"):
        with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}: rlvr takes each RL method's"):
            module.run(load_config(module.Config, config_path("rlvr"), base + [override]))
    module.run(load_config(module.Config, config_path("rlvr"), base + ["eval_samples=4"]))  # scoring may change
    record = tmp_path / "grpo" / "stage.json"  # a stage finished before max_steps was a recorded setting
    old = json.loads(record.read_text())
    del old["settings"]["max_steps"]
    record.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"^max_steps: the finished grpo stage in .* records no max_steps \(this "
                                          r"command asks for 1\)"):
        module.run(load_config(module.Config, config_path("rlvr"), base))


def test_grpo_async_is_grpo_with_generation_in_its_own_process_max_lag_steps_behind(tmp_path):
    """The `grpo_async` method trains GRPO's loss with async generation at the config's lag; every other key is
    GRPO's, so its row compares with GRPO's."""
    from paperloop import load_config
    from paperloop.models.lm import tiny_causal_lm
    from paperloop.papers import config_path, load
    from paperloop.papers.rlvr.task import make_tokenizer

    module = load("rlvr")
    tokenizer = make_tokenizer()
    tiny_causal_lm(len(tokenizer), 16, 1, seed=0).save_pretrained(tmp_path / "sft")
    configs = {}
    for method, overrides in (("grpo", []), ("grpo_async", []), ("grpo_async", ["max_lag=2"])):
        cfg = load_config(module.Config, config_path("rlvr"), [f"output_dir={tmp_path}", *overrides])
        trainer = module.rl_trainer(cfg, tokenizer, [(10, 11)], method, tmp_path / method, tmp_path / "sft", 0)
        configs[method, *overrides] = trainer.config
        assert (trainer.generation is not None) == (method == "grpo_async")
    sync, lag_1, lag_2 = configs.values()
    assert (lag_1.async_generation, lag_1.max_lag, lag_2.max_lag) == (True, 1, 2)
    assert {key for key in sync.__dataclass_fields__ if getattr(sync, key) != getattr(lag_1, key)} == {
        "async_generation", "output_dir"}

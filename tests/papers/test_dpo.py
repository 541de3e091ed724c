"""papers/dpo: the true reward and its pairs, the KL estimate (0 for the reference itself, growing with training),
the frontier bookkeeping, and a tiny end-to-end run of `paperloop run dpo` whose second run reuses the stages."""

import json

import pytest
import torch

from paperloop.models.lm import tiny_causal_lm
from paperloop.papers.dpo.evaluate import dominance, preference_pairs, sequence_kl
from paperloop.papers.dpo.task import COMPLETION_WORDS, make_tokenizer, prompts, sft_examples, true_reward


def test_the_true_reward_reads_sentiment_words_and_the_reviews_are_fixed_by_the_seed():
    assert true_reward("the film", "is and the") == 0.5  # neutral words: σ(0)
    assert true_reward("the film", "good") > 0.5 > true_reward("the film", "bad")
    assert true_reward("the film", "wonderful") > true_reward("the film", "good")  # a stronger word weighs more
    assert true_reward("awful film", "good") < true_reward("the film", "good")  # the opening counts too
    examples = sft_examples(3, seed=0)
    assert examples == sft_examples(3, seed=0) != sft_examples(3, seed=1)
    assert all(len(e["completion"].split()) == COMPLETION_WORDS for e in examples)
    tok = make_tokenizer()
    assert tok.unk_token_id not in tok(examples[0]["prompt"] + examples[0]["completion"])["input_ids"]


def test_pairs_are_labelled_by_the_true_reward_and_ties_are_left_out():
    tok = make_tokenizer()
    model = tiny_causal_lm(len(tok), 16, 1, seed=0)
    openings = prompts(40, seed=3)
    pairs = preference_pairs(model, tok, openings, 6, seed=0)
    assert 0 < len(pairs) <= 40
    for pair in pairs:
        assert true_reward(pair["prompt"], pair["chosen"]) > true_reward(pair["prompt"], pair["rejected"])
    assert preference_pairs(model, tok, openings, 6, seed=0) == pairs  # a seeded draw


def test_the_kl_is_zero_for_the_reference_itself_and_matches_a_hand_computed_case():
    tok = make_tokenizer()
    policy, reference = tiny_causal_lm(len(tok), 16, 1, seed=0), tiny_causal_lm(len(tok), 16, 1, seed=1)
    prompt_rows, completions = [[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 2]]
    assert torch.equal(sequence_kl(policy, policy, prompt_rows, completions, tok.pad_token_id), torch.zeros(2))
    kl = sequence_kl(policy, reference, prompt_rows, completions, tok.pad_token_id)
    expected = []
    for prompt, completion in zip(prompt_rows, completions):  # one row at a time, no padding
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = policy(input_ids=ids).logits.double().log_softmax(-1)[0]
            logq = reference(input_ids=ids).logits.double().log_softmax(-1)[0]
        positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
        expected.append(sum(float((logp[t].exp() * (logp[t] - logq[t])).sum()) for t in positions))
    assert kl.tolist() == pytest.approx(expected, rel=1e-4) and min(expected) > 0


def test_dominance_counts_points_with_no_more_kl_and_no_less_reward():
    rows = [{"method": "dpo", "seed": 0, "kl": 1.0, "reward": 0.8}, {"method": "dpo", "seed": 0, "kl": 4.0, "reward": 0.9},
            {"method": "grpo_true", "seed": 0, "kl": 2.0, "reward": 0.7},  # dominated by dpo's first point
            {"method": "grpo_true", "seed": 0, "kl": 0.5, "reward": 0.6},  # less KL: not dominated
            {"method": "grpo_true", "seed": 1, "kl": 9.0, "reward": 0.1}]  # another seed: no dpo point to compare
    assert dominance(rows, "dpo", "grpo_true") == {"grpo_true_dominated_by_dpo": 1, "dpo_dominated_by_grpo_true": 0,
                                                   "dpo_points": 2, "grpo_true_points": 3}


def test_the_shipped_config_loads_and_refuses_a_beta_it_would_throw_away(tmp_path):
    from paperloop import ConfigError, load_config
    from paperloop.papers import available, config_path, load

    module = load("dpo")
    assert "dpo" in available()
    cfg = load_config(module.Config, config_path("dpo"))
    assert cfg.seeds == (0,) and cfg.dpo_betas == (0.1, 1.0, 3.0, 10.0) and cfg.grpo_betas == (0.1, 0.3, 1.0)
    with pytest.raises(ConfigError, match="^dpo_betas"):
        load_config(module.Config, config_path("dpo"), ["dpo_betas=[0.1,0.1]"])
    with pytest.raises(ConfigError, match="^beta"):
        module.run(load_config(module.Config, config_path("dpo"), ["beta=0.1", f"output_dir={tmp_path}"]))


def test_tiny_end_to_end_run_writes_the_frontier_and_a_second_run_reuses_the_stages(tmp_path):
    from paperloop import load_config
    from paperloop.papers import config_path, load

    module = load("dpo")
    overrides = [f"output_dir={tmp_path}", "hidden_size=16", "num_layers=1", "sft_reviews=256", "sft_steps=8",
                 "sft_batch_size=32", "pair_prompts=48", "dpo_betas=[0.1]", "ipo_taus=[1.0]", "dpo_steps=3",
                 "dpo_batch_size=8", "rm_steps=2", "rm_batch_size=8", "grpo_betas=[0.1]", "rl_prompts=16",
                 "max_steps=2", "batch_size=4", "num_generations=2", "eval_prompts=8", "eval_samples=2",
                 "dpo_lr=0.01", "lr=0.01", "checkpoint_every_steps=2", "log_every_steps=1"]
    cfg = load_config(module.Config, config_path("dpo"), overrides)
    module.run(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["method"], r["setting"]): r for r in result["rows"]}
    assert list(rows) == [("sft", "-"), ("dpo", 0.1), ("ipo", 1.0), ("grpo_true", 0.1), ("grpo_rm", 0.1)]
    assert rows["sft", "-"]["kl"] == 0.0  # the reference against itself: exactly 0
    for key, row in rows.items():
        assert 0 < row["reward"] < 1 and 1 <= row["completion_len"] <= cfg.max_new_tokens
        if key[0] != "sft":
            assert row["kl"] > 0  # trained away from the reference
    assert set(result["dominance"]) == {"dpo vs grpo_true", "dpo vs grpo_rm", "ipo vs grpo_true", "dpo vs ipo"}
    assert result["per_seed"]["seed0"]["pairs"] > 0
    assert result["per_seed"]["seed0"]["reward_model_val_accuracy"] is not None
    assert (tmp_path / "results.png").stat().st_size > 10_000 and "| DPO | 0.1 |" in (tmp_path / "results.md").read_text()
    weights = tmp_path / "seed0" / "dpo_0.1" / "model" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    module.run(cfg)  # every stage is done: loaded, not trained again; the same evaluation
    assert weights.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]

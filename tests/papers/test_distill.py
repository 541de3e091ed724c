"""papers/distill: SeqKD's data are the teacher's completions, every method trains the same steps on the same number of
completions, the accuracy curve changes nothing a run trains and survives a resume, the config's errors name their
key, and a tiny end-to-end run of `paperloop run distill` whose second run reuses the stages already done."""

import json

import pytest
import torch

from paperloop.models.lm import tiny_causal_lm
from paperloop.papers.distill.evaluate import AccuracyCurve, completions, gap_closed, seqkd_examples
from paperloop.papers.rlvr.task import make_tokenizer, split_problems
from tests.support.callbacks import StopAt

TINY = ["teacher_hidden_size=32", "teacher_num_layers=1", "teacher_sft_steps=6", "teacher_rl_steps=2",
        "teacher_rl_batch_size=4", "teacher_num_generations=2", "student_hidden_size=16", "student_num_layers=1",
        "student_sft_steps=3", "held_out=16", "max_steps=4", "batch_size=4", "num_generations=2", "eval_every=2",
        "eval_samples=4", "checkpoint_every_steps=2", "log_every_steps=1"]


def load(overrides):
    from paperloop import load_config
    from paperloop.papers import config_path, load as load_paper

    module = load_paper("distill")
    return module, load_config(module.Config, config_path("distill"), overrides)


def test_seqkd_data_are_the_teachers_completions_fixed_by_the_seed():
    tok = make_tokenizer()
    teacher = tiny_causal_lm(len(tok), 16, 1, seed=0)
    pairs = split_problems(8000, seed=0)[1][:40]
    sampled = seqkd_examples(teacher, tok, pairs, 6, temperature=1.0, seed=0)
    assert [e["prompt"] for e in sampled] == [f"{a}+{b}=" for a, b in pairs]
    assert [e["completion"] for e in sampled] == completions(teacher, tok, pairs, 6, 1.0, seed=0)
    assert seqkd_examples(teacher, tok, pairs, 6, temperature=1.0, seed=0) == sampled != seqkd_examples(
        teacher, tok, pairs, 6, temperature=1.0, seed=1)
    assert sum(e["completion"] == str(a + b) for e, (a, b) in zip(sampled, pairs)) < 5  # not the ground truth
    greedy = seqkd_examples(teacher, tok, pairs, 6, temperature=0.0, seed=0)
    assert greedy == seqkd_examples(teacher, tok, pairs, 6, temperature=0.0, seed=1)  # greedy: no draw
    ids = tok(greedy[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = int(teacher(input_ids=ids).logits[0, -1].argmax())
    assert greedy[0]["completion"].startswith(tok.decode([first], skip_special_tokens=True))


def test_every_method_trains_the_same_steps_on_the_same_number_of_completions(tmp_path):
    """Equal budgets: `max_steps` optimizer steps at `lr` for every method; a step holds batch_size x num_generations
    completions (RL: that many samples; SFT: that many examples); the teacher only where the method reads it."""
    from paperloop import RLTrainer, SFTTrainer

    module, cfg = load([f"output_dir={tmp_path}", *TINY])
    tok = make_tokenizer()
    train, held_out = split_problems(cfg.held_out, cfg.data_seed)
    start, teacher = tmp_path / "start", tiny_causal_lm(len(tok), 16, 1, seed=1)
    tiny_causal_lm(len(tok), 16, 1, seed=0).save_pretrained(start)
    seqkd = seqkd_examples(teacher, tok, train[:64], 6, 0.0, 0)
    trainers = {m: module.student_trainer(cfg, tok, train, held_out, m, 3, tmp_path / m, start, teacher, seqkd)
                for m in module.METHODS}
    for method, trainer in trainers.items():
        c = trainer.config
        assert (c.max_steps, c.lr, c.seed) == (4, getattr(cfg, module.LR_KEY[method]), 3)
        sequences = c.batch_size * (c.num_generations if isinstance(trainer, RLTrainer) else 1)
        assert sequences == cfg.batch_size * cfg.num_generations == 8
        assert (trainer.teacher is not None) == (method in ("supervised_kd", "on_policy", *module.GKD)), method
    assert all(isinstance(trainers[m], SFTTrainer) for m in ("sft", "seqkd", "supervised_kd"))
    assert trainers["supervised_kd"].config.distill == "forward_kl" and trainers["supervised_kd"].config.distill_weight == 1
    assert trainers["on_policy"].reward_names == [] and trainers["grpo"].reward_names == ["correct"]
    for method, texts in (("seqkd", seqkd), ("sft", [{"completion": str(a + b)} for a, b in train[:64]])):
        first = trainers[method].train_data[0]  # the trained tokens of the first example: its completion and EOS
        trained = first.target_tokens[first.weights > 0].tolist()
        assert tok.decode(trained, skip_special_tokens=True) == texts[0]["completion"], method


@pytest.mark.parametrize("method, beta", [("gkd_reverse_kl", 1.0), ("gkd_jsd", 0.5)])
def test_gkd_trains_the_exact_divergence_from_the_teacher_on_the_students_own_samples(tmp_path, method, beta):
    """GKD's loss of a step is the divergence over the whole vocabulary at each token the student sampled (not the
    prompt's), averaged over those tokens — computed here from both models' full logits, in float64 — and it is 0
    when the teacher is the student."""
    module, cfg = load([f"output_dir={tmp_path}", *TINY])
    tok = make_tokenizer()
    train, held_out = split_problems(cfg.held_out, cfg.data_seed)
    start, teacher = tmp_path / "start", tiny_causal_lm(len(tok), 16, 1, seed=1)
    tiny_causal_lm(len(tok), 16, 1, seed=0).save_pretrained(start)
    trainer = module.student_trainer(cfg, tok, train, held_out, method, 0, tmp_path / method, start, teacher)
    seen = []
    real = trainer.training_step
    trainer.training_step = lambda batch: seen.append((batch, *real(batch))) or seen[-1][1:]
    trainer.fit()
    batch, loss, metrics = seen[0]
    assert batch["weights"].sum() > 0 and not batch["weights"][:, :3].any()  # `a+b=` is the prompt: not trained
    start_model = tiny_causal_lm(len(tok), 16, 1, seed=0)  # the student before its first update
    with torch.no_grad():
        logp = start_model(input_ids=batch["input_ids"]).logits.double().log_softmax(-1)
        logq = teacher(input_ids=batch["input_ids"]).logits.double().log_softmax(-1)
    p, q = logp.exp(), logq.exp()
    if beta == 1.0:
        divergence = (p * (logp - logq)).sum(-1)  # KL(student ‖ teacher)
    else:
        logm = (beta * q + (1 - beta) * p).log()
        divergence = beta * (q * (logq - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)
    weights = batch["weights"].double()
    expected = (divergence * weights).sum() / weights.sum()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    assert float(metrics["policy/divergence"]) == pytest.approx(float(expected), rel=1e-4)
    same = module.student_trainer(cfg, tok, train, held_out, method, 0, tmp_path / "same", start,
                                  tiny_causal_lm(len(tok), 16, 1, seed=0))
    assert float(same.training_step(batch)[0]) == pytest.approx(0.0, abs=1e-6)


def train_with_curve(tmp_path, name, curve, extra=(), resume=None):
    from paperloop import SFTConfig, SFTTrainer
    from paperloop.papers.rlvr.task import sft_examples

    tok = make_tokenizer()
    train, held_out = split_problems(16, 0)
    callbacks = ([AccuracyCurve(tok, held_out, 6, 2, tmp_path / name / "curve.json")] if curve else []) + list(extra)
    config = SFTConfig(max_length=16, batch_size=8, lr=1e-2, max_steps=5, output_dir=str(tmp_path / name),
                       checkpoint_every_steps=100)
    trainer = SFTTrainer(tiny_causal_lm(len(tok), 16, 1, seed=0), config, tokenizer=tok,
                         train_data=sft_examples(train[:200]), callbacks=callbacks)
    trainer.fit(resume=resume)
    return trainer


def test_the_accuracy_curve_changes_no_weight_and_a_resumed_run_records_the_straight_runs_curve(tmp_path):
    plain = train_with_curve(tmp_path, "plain", curve=False)
    straight = train_with_curve(tmp_path, "straight", curve=True)
    for a, b in zip(plain.unwrapped_model.parameters(), straight.unwrapped_model.parameters()):
        assert torch.equal(a, b)
    points = json.loads((tmp_path / "straight" / "curve.json").read_text())
    assert [s for s, _ in points] == [2, 4, 5]  # every 2 steps and the last
    stopped = train_with_curve(tmp_path, "resumed", curve=True, extra=[StopAt(3, checkpoint=True)])
    assert stopped.state.interrupted and not (tmp_path / "resumed" / "curve.json").exists()
    train_with_curve(tmp_path, "resumed", curve=True, resume="latest")
    assert json.loads((tmp_path / "resumed" / "curve.json").read_text()) == points


def test_the_shipped_config_loads_and_its_errors_name_the_key(tmp_path):
    from paperloop import ConfigError
    from paperloop.papers import available

    assert "distill" in available()
    module, cfg = load([])
    assert cfg.methods == module.METHODS and cfg.seeds == (0,) and cfg.max_steps == 200
    for override, key in (("methods=[sft,ppo]", "methods"), ("methods=[sft,sft]", "methods"),
                          ("seeds=[0,0]", "seeds"), ("eval_samples=12", "eval_samples"), ("seed=1", "seed"),
                          ("seqkd_temperature=-1", "seqkd_temperature"), ("student_sft_steps=0", "student_sft_steps"),
                          ("teacher_num_generations=1", "teacher_num_generations"), ("gkd_num_generations=3", "gkd_num_generations"), ("max_steps=null", "max_steps")):
        with pytest.raises(ConfigError, match=f"^{key}"):
            load([override])
    for override, key in (("beta=0.1", "beta"), ("distill_coef=0.5", "distill_coef")):
        with pytest.raises(ConfigError, match=f"^{key}: distill compares"):
            module.run(load([override, f"output_dir={tmp_path}"])[1])
    with pytest.raises(ConfigError, match="^distill_discount: only on_policy"):
        module.run(load(["distill_discount=1.0", f"output_dir={tmp_path}"])[1])
    assert not any(tmp_path.iterdir())  # refused before any stage trained
    assert gap_closed(0.6, start=0.2, teacher=0.8) == pytest.approx(2 / 3)


def test_tiny_end_to_end_run_writes_the_curves_and_a_second_run_reuses_the_stages(tmp_path):
    from paperloop import ConfigError

    module, cfg = load([f"output_dir={tmp_path}", *TINY])
    module.run(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == list(module.METHODS)
    for row in result["rows"]:
        assert [s for s, _ in row["curve"]] == [2, 4]  # the same steps for every method
        assert 0 <= row["greedy_acc"] <= 1 and list(row["pass_at"]) == ["1", "2", "4"]
    assert result["sequences_per_step"] == 8 and result["steps"] == 4
    assert json.loads((tmp_path / "seed0" / "grpo" / "stage.json").read_text())["prompts_sampled"] == 4 * 4
    assert {"greedy_acc", "pass_at"} <= set(result["teacher"]) and {"greedy_acc"} <= set(result["student_start"])
    assert [m["method"] for m in result["over_seeds"]] == list(module.METHODS)
    assert (tmp_path / "results.png").stat().st_size > 10_000 and "| SeqKD" in (tmp_path / "results.md").read_text()
    assert len(json.loads((tmp_path / "seed0" / "seqkd_data.json").read_text())["examples"]) == 8100 - 16
    weights = tmp_path / "seed0" / "on_policy" / "model" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    module.run(cfg)  # every stage is done: loaded, not trained again; the same evaluation
    assert weights.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]
    with pytest.raises(ConfigError, match="^student_sft_steps: the finished student_sft stage"):
        module.run(load([f"output_dir={tmp_path}", *TINY, "student_sft_steps=4"])[1])
    with pytest.raises(ConfigError, match="^seqkd_temperature: .*seqkd_data.json holds SeqKD data"):
        module.run(load([f"output_dir={tmp_path}", *TINY, "seqkd_temperature=1.0", "methods=[seqkd]"])[1])

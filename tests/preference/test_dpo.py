"""DPOTrainer: its updates against a naive loop from the papers' formulas, invariance to how a step is split, the
reference (the initial policy, never the trained one, after a resume too), skipped pairs, chat pairs."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paperloop.callbacks import LambdaCallback
from paperloop.config import ConfigError
from paperloop.plans import epoch_permutation
from paperloop.preference import DPOConfig, tokenize_pairs

from paperloop.lm.losses import forward_logprobs
from tests.preference.worker import DISTRIBUTED
from tests.support.preference import make_dpo, make_pairs
from tests.support.rl import make_lm, make_tokenizer
from tests.support.workers import run_worker


def sequence_logps(model, prompt: str, completion: str, tok) -> tuple[torch.Tensor, int]:
    """Σ log π(completion | prompt) (EOS included), one unpadded float64 forward; and the completion's length."""
    prompt_ids = tok(prompt)["input_ids"]
    ids = prompt_ids + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logprobs = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0, :-1], dim=-1)
    targets = torch.tensor(ids[1:])
    return logprobs.gather(1, targets[:, None])[len(prompt_ids) - 1:, 0].sum(), len(ids) - len(prompt_ids)


def naive_dpo(cfg: DPOConfig, steps: int):
    """DPO (+ RPO's NLL) by the formulas: per step, the mean over its pairs of -log σ(β Δ), plus weight x the chosen
    tokens' NLL over the step's chosen tokens; SGD; the reference is the initial model."""
    tok, data = make_tokenizer(), make_pairs()
    policy, reference = make_lm(tok).double(), make_lm(tok).double()
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    B = cfg.batch_size * cfg.grad_accum_steps
    order = torch.cat([epoch_permutation(len(data), cfg.seed, e) for e in range(2)])
    weights = dict(zip(cfg.loss, cfg.loss_weights or (1.0,) * len(cfg.loss)))
    for s in range(steps):
        pairs = [data[i] for i in order[s * B:(s + 1) * B].tolist()]
        optimizer.zero_grad()
        dpo, nll, tokens = 0.0, 0.0, 0
        for pair in pairs:
            (chosen, n), (rejected, _) = (sequence_logps(policy, pair["prompt"], pair[k], tok) for k in ("chosen", "rejected"))
            with torch.no_grad():
                (ref_chosen, _), (ref_rejected, _) = (sequence_logps(reference, pair["prompt"], pair[k], tok)
                                                      for k in ("chosen", "rejected"))
            delta = (chosen - ref_chosen) - (rejected - ref_rejected)
            dpo = dpo - torch.nn.functional.logsigmoid(cfg.beta * delta) / len(pairs)
            nll, tokens = nll - chosen, tokens + n
        loss = weights.get("sigmoid", 0.0) * dpo + weights.get("sft", 0.0) * nll / tokens
        loss.backward()
        optimizer.step()
    return policy


@pytest.mark.parametrize("settings", [dict(), dict(loss=("sigmoid", "sft"), loss_weights=(1.0, 0.5)),
                                      dict(loss=("sigmoid", "sft"), batch_size=2, grad_accum_steps=2)])
def test_updates_match_a_naive_loop_from_the_formulas(tmp_path, settings):
    trainer = make_dpo(tmp_path, model=make_lm(make_tokenizer()).double(), max_steps=3, **settings)
    trainer.fit()
    expected = naive_dpo(trainer.config, steps=3)
    initial = make_lm(make_tokenizer()).double().state_dict()
    moved = 0.0
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(trainer.unwrapped_model.state_dict()[name], value, rtol=0, atol=1e-10)
        moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-3


def test_the_update_does_not_depend_on_how_a_step_is_split(tmp_path):
    """1 x 8 pairs, 4 x 2 micro-batches, 2 x 4: the same weights (float64), the sft term's token mean included."""
    runs = [make_dpo(tmp_path / f"run{k}", model=make_lm(make_tokenizer()).double(), max_steps=2,
                     loss=("sigmoid", "sft"), batch_size=8 // k, grad_accum_steps=k) for k in (1, 4, 2)]
    for run in runs:
        run.fit()
    for name, value in runs[0].unwrapped_model.state_dict().items():
        for other in runs[1:]:
            torch.testing.assert_close(other.unwrapped_model.state_dict()[name], value, rtol=0, atol=1e-12)


def test_metrics_are_trls_and_start_at_zero_reward(tmp_path):
    outputs = []
    trainer = make_dpo(tmp_path, max_steps=2, val_data=make_pairs(6, seed=1),
                       callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))])
    trainer.fit()
    first = outputs[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "train/loss"):
        assert key in first and math.isfinite(float(first[key])), key
    # before the first update the policy is the reference: every implicit reward 0, the loss log 2
    assert float(first["rewards/chosen"]) == 0 and float(first["rewards/margins"]) == 0
    assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)
    val = trainer.validate()
    assert {"val/loss", "val/rewards/chosen", "val/rewards/accuracies", "val/logps/rejected"} <= set(val)


def test_the_reference_is_the_initial_policy_after_a_resume_and_the_run_ends_bitwise(tmp_path):
    """Stopped at step 3 and resumed: the reference's log-probs are bitwise those of the initial weights (the
    trained weights are loaded after the reference is taken), and the run ends where an uninterrupted one does."""
    straight = make_dpo(tmp_path / "straight")
    straight.fit()
    stop = LambdaCallback(on_batch_end=lambda t, o: t.state.global_step == 3 and t.request_stop("x", resumable=True))
    make_dpo(tmp_path / "resumed", callbacks=[stop], checkpoint_every_steps=1).fit()
    resumed = make_dpo(tmp_path / "resumed", checkpoint_every_steps=1)
    resumed.fit(resume="latest")
    for name, value in straight.unwrapped_model.state_dict().items():
        assert torch.equal(resumed.unwrapped_model.state_dict()[name], value), name
    initial = make_lm(make_tokenizer())
    batch = resumed.fetch(torch.arange(4))
    with torch.no_grad():
        expected = forward_logprobs(initial, batch).logprobs
    assert torch.equal(resumed.reference_logprobs(batch), expected)


def test_a_resume_built_from_another_initial_model_is_refused(tmp_path):
    from paperloop import CheckpointError

    stop = LambdaCallback(on_batch_end=lambda t, o: t.state.global_step == 2 and t.request_stop("x", resumable=True))
    trainer = make_dpo(tmp_path, callbacks=[stop], checkpoint_every_steps=1)
    trainer.fit()
    with pytest.raises(CheckpointError, match="reference model: this run's initial model is not the one"):
        make_dpo(tmp_path, model=trainer.unwrapped_model).fit(resume="latest")  # the trained weights as "initial"


def test_precomputed_reference_log_probs_train_the_same_and_are_reused_on_resume(tmp_path):
    on_the_fly = make_dpo(tmp_path / "fly", model=make_lm(make_tokenizer()).double(), max_steps=4)
    on_the_fly.fit()
    stop = LambdaCallback(on_batch_end=lambda t, o: t.state.global_step == 2 and t.request_stop("x", resumable=True))
    make_dpo(tmp_path / "pre", model=make_lm(make_tokenizer()).double(), max_steps=4, precompute_ref_logprobs=True,
             checkpoint_every_steps=1, callbacks=[stop]).fit()
    cached = list((tmp_path / "pre" / "reference").glob("*.safetensors"))
    assert len(cached) == 1
    resumed = make_dpo(tmp_path / "pre", model=make_lm(make_tokenizer()).double(), max_steps=4,
                       precompute_ref_logprobs=True, checkpoint_every_steps=1)
    calls = []
    score = resumed.reference_logprobs
    resumed.reference_logprobs = lambda *a, **k: calls.append(1) or score(*a, **k)
    resumed.fit(resume="latest")
    assert calls == []  # read from the run folder, not scored again
    for name, value in on_the_fly.unwrapped_model.state_dict().items():
        torch.testing.assert_close(resumed.unwrapped_model.state_dict()[name], value, rtol=0, atol=1e-12)


def test_pairs_with_nothing_left_to_score_are_skipped_and_counted(tmp_path):
    tok = make_tokenizer()
    pairs = make_pairs(4) + [{"prompt": "1" * 40, "chosen": "2", "rejected": "3"}]
    kept, skipped = tokenize_pairs(pairs, tok, max_length=20)
    assert len(kept) == 4 and skipped == [(4, "no chosen or rejected token left after truncation to max_length=20")]
    with pytest.raises(ValueError, match="pair 0: a preference pair is a dict with 'prompt', 'chosen' and "
                                         "'rejected'; got \\['chosen', 'prompt'\\]"):
        tokenize_pairs([{"prompt": "1+1=", "chosen": "2"}], tok, max_length=20)


def test_a_chat_pair_scores_its_completion_not_the_assistant_turns_of_its_prompt():
    tok = make_tokenizer()
    prompt = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "3"},
              {"role": "user", "content": "again"[:0] + "1+1="}]
    (pair,), _ = tokenize_pairs([{"prompt": prompt, "chosen": "2", "rejected": [{"role": "assistant", "content": "5"}]}],
                                tok, max_length=64)
    for side, answer in ((pair.chosen, "2"), (pair.rejected, "5")):
        trained = side.target_tokens[side.weights > 0].tolist()
        assert tok.decode(trained) == answer + "<|end|>"  # the completion and its end-of-turn marker, not "3"


@pytest.mark.parametrize("settings, key", [
    (dict(loss=("dpo",)), "loss"), (dict(loss=("sigmoid", "sft"), loss_weights=(1.0,)), "loss_weights"),
    (dict(beta=0.0), "beta"), (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(loss=("hinge",), label_smoothing=0.1), "label_smoothing"), (dict(simpo_gamma=1.0), "simpo_gamma"),
    (dict(loss=("simpo",), precompute_ref_logprobs=True), "precompute_ref_logprobs"),
])
def test_config_errors_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        DPOConfig(**settings)


def test_a_reference_free_loss_builds_no_reference(tmp_path):
    trainer = make_dpo(tmp_path, loss=("simpo",), max_steps=2, beta=2.0)
    assert trainer.reference is None and trainer.reference_checksum is None
    trainer.fit()
    assert trainer.state.global_step == 2


WORKER = Path(__file__).with_name("worker.py")


def test_sigkill_then_resume_ends_bitwise_on_the_uninterrupted_run_with_the_initial_reference(tmp_path):
    proc = run_worker(WORKER, "--out", tmp_path, "--kill-at-step", 5, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    resumed = make_dpo(tmp_path, checkpoint_every_steps=1)
    resumed.fit(resume="latest")
    straight = make_dpo(tmp_path / "straight")
    straight.fit()
    assert resumed.state.global_step == straight.state.global_step == 8
    for name, value in straight.unwrapped_model.state_dict().items():
        assert torch.equal(resumed.unwrapped_model.state_dict()[name], value), name
    batch = resumed.fetch(torch.arange(4))
    assert torch.equal(resumed.reference_logprobs(batch), forward_logprobs(make_lm(make_tokenizer()), batch).logprobs)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, strategy):
    run_worker(WORKER, "--out", tmp_path, "--strategy", strategy, processes=2, timeout=240)
    single = make_dpo(tmp_path / "single", **{**DISTRIBUTED, "batch_size": 8, "grad_accum_steps": 1})
    single.fit()
    two = load_file(str(tmp_path / "final.safetensors"))
    for name, value in single.unwrapped_model.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-5)  # float32, other reduction orders
    moved = max((value - make_lm(make_tokenizer()).state_dict()[name]).abs().max().item()
                for name, value in single.unwrapped_model.state_dict().items())
    assert moved > 1e-2  # far above the tolerance: a wrong normalizer would show


def test_lora_with_gradient_checkpointing_trains_the_adapters_against_the_base_as_reference(tmp_path):
    pytest.importorskip("peft")
    trainer = make_dpo(tmp_path, max_steps=2, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       gradient_checkpointing=True, lr=0.05)
    assert trainer.reference is None  # the base itself, adapters off: no copy
    trainer.fit()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    batch = trainer.fetch(torch.arange(4))
    base = forward_logprobs(make_lm(make_tokenizer()), batch).logprobs
    torch.testing.assert_close(trainer.reference_logprobs(batch), base, rtol=0, atol=1e-6)
    assert not torch.allclose(trainer.forward(batch).logprobs, base, atol=1e-4)  # while the policy moved

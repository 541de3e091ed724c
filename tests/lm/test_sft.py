"""SFTTrainer: the loss over the whole step's trained tokens however the step is split, packing that changes
no example's loss (with the model's default config), token-budget and length-bucketed plans, skips, metrics,
validation, checkpoints that load with from_pretrained, and bitwise resume after SIGKILL."""

import logging
import math
from pathlib import Path

import pytest
import torch

from tests.support.callbacks import StopAt
from tests.support.engine import assert_bitwise_equal, optimizer_tensors, weights
from tests.support.workers import run_worker
from paperloop import ConfigError, SFTConfig, SFTTrainer, load_config
from paperloop.callbacks import LambdaCallback
from paperloop.plans import epoch_permutation
from paperloop.lm.data import TokenizedExample, pack_rows, pad_batch
from paperloop.lm.plans import BucketedPlan, PackedPlan, PaddedPlan, fill_micro_batches
from paperloop.lm.losses import forward_logprobs
from paperloop.lm.sampling import default_stop_token_ids
from tests.support.lm import make_trainer, model, sorting_examples, tokenizer

WORKER = Path(__file__).with_name("resume_worker.py")


class SGDTrainer(SFTTrainer):
    """Plain SGD shows any error in the gradient's scale (Adam would normalize most of it away)."""

    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


def fit_recording(trainer):
    outputs = []
    trainer.callbacks.append(LambdaCallback(on_batch_end=lambda t, o: outputs.append(dict(o))))
    trainer.fit()
    return outputs


def naive_step_loss(model, examples) -> float:
    """Σ -log p over every trained token of the examples / their trained tokens, one example at a time, unpadded."""
    nll, tokens = 0.0, 0.0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=e.input_ids[None]).logits[0].double()
            logprobs = torch.log_softmax(logits, -1).gather(-1, e.target_tokens[:, None])[:, 0]
            nll -= float((logprobs * e.weights).sum())
            tokens += float(e.weights.sum())
    return nll / tokens


# ---- the weighted step ----------------------------------------------------------------------------


def test_batch_8_equals_2_by_4_accumulation_and_the_loss_is_the_steps_token_mean(tmp_path):
    runs, initial = {}, model()
    for batch_size, accum in ((8, 1), (2, 4)):
        t = SGDTrainer(model(), SFTConfig(max_length=24, batch_size=batch_size, grad_accum_steps=accum, lr=0.1,
                                          max_epochs=2, output_dir=str(tmp_path / str(accum))),
                       tokenizer=tokenizer(), train_data=sorting_examples(44))
        runs[accum] = (t, fit_recording(t))
    (big, big_out), (small, small_out) = runs[1], runs[4]
    for k, v in weights(big.model).items():
        torch.testing.assert_close(weights(small.model)[k], v, rtol=0, atol=1e-6)
    assert [float(o["train/loss"]) for o in small_out] == pytest.approx([float(o["train/loss"]) for o in big_out], rel=1e-6)
    # The first step's loss is the mean over its examples' trained tokens (not the mean of per-example means).
    first = [big.train_data[i] for i in epoch_permutation(len(big.train_data), 0, 0)[:8].tolist()]
    assert float(big_out[0]["train/loss"]) == pytest.approx(naive_step_loss(initial, first), rel=1e-5)
    per_example = sum(naive_step_loss(initial, [e]) for e in first) / 8
    assert naive_step_loss(initial, first) != pytest.approx(per_example, rel=1e-3)  # the weighting matters here


def test_each_example_weighs_its_trained_tokens(tmp_path):
    t = make_trainer(tmp_path)
    expected = [float(e.weights.sum()) for e in t.train_data]
    assert t.sample_weights().tolist() == expected
    assert len(set(expected)) > 3  # varied lengths: unweighted means would differ


# ---- packing ---------------------------------------------------------------------------------------


def test_packed_rows_keep_every_examples_loss_with_the_default_config(tmp_path):
    t = make_trainer(tmp_path, packing=True, pack_length=48)
    assert t.unwrapped_model.config.use_cache is True  # the default that leaks across packed examples
    examples = t.train_data[:12]
    batch = t.make_plan().collate(examples)  # the packed plan owns the layout of training batches
    assert batch["input_ids"].shape[1] == 48 and batch["input_ids"].shape[0] < 12  # several examples a row
    packed_B_T = token_logprobs_of(t, batch)
    for row, members in enumerate(pack_rows([len(e) for e in examples], 48)):
        start = 0
        for i in members:
            alone = token_logprobs_of(t, pad_batch([examples[i]], 0))[0]
            torch.testing.assert_close(packed_B_T[row, start:start + len(examples[i])], alone, rtol=0, atol=1e-5)
            start += len(examples[i])
    # and the trainer's loss on the packed batch is the token mean over all of them
    assert float(t.training_step(batch).detach()) == pytest.approx(naive_step_loss(t.unwrapped_model, examples), rel=1e-5)


def token_logprobs_of(trainer, batch):
    with torch.no_grad():
        return forward_logprobs(trainer.model, batch)[0]


def test_training_and_validation_never_make_the_logits_of_more_than_one_chunk(tmp_path, monkeypatch):
    """What would fail if SFT's steps scored through the model's full logits: the output layer's own output is two
    rows per forward (the post-processing check), every chunk of logits at most CHUNK_ELEMENTS."""
    import paperloop.lm.losses as losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 5 * 21)
    chunks, make = [], losses._chunk_logits
    monkeypatch.setattr(losses, "_chunk_logits", lambda *args: chunks.append(make(*args)[0].numel()) or make(*args))
    t = make_trainer(tmp_path, n=16, val=8, max_epochs=1, val_every=1)
    V = t.unwrapped_model.config.vocab_size
    assert V == 21
    rows = []
    t.unwrapped_model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.numel() // V))
    t.fit()
    assert t.state.global_step == 2 and "val/loss" in t.state.val_history[-1]
    assert rows and max(rows) == 2  # the first and last scored positions: the post-processing check
    assert len(chunks) > 10 and max(chunks) <= 5 * 21


def test_fill_micro_batches_by_a_token_budget_hand_computed():
    order = torch.arange(5)
    lengths = [5, 3, 4, 2, 6]
    # rows of 8, one row a micro-batch: 5+3 | 4+2 (6 does not fit the 2 left) | 6
    assert [m.tolist() for m in fill_micro_batches(order, lengths, 8, 1)] == [[0, 1], [2, 3], [4]]
    # two rows: 5+3 | 4+2, then 6 finds no room in either and starts the next micro-batch
    assert [m.tolist() for m in fill_micro_batches(order, lengths, 8, 2)] == [[0, 1, 2, 3], [4]]
    # no look-ahead: 5 does not fit beside 6, so it starts the next micro-batch, which 2 then joins
    assert [m.tolist() for m in fill_micro_batches(torch.tensor([4, 0, 3]), lengths, 8, 1)] == [[4], [0, 3]]
    packed, padded = PackedPlan(lengths, 0, row_len=8, rows=2), PaddedPlan(lengths, 0, batch_size=4)
    assert packed.positions([5, 3, 4, 2]) == 16 and padded.positions([5, 3, 4]) == 15


def test_packed_plan_covers_the_epoch_once_within_budget_and_splits_over_ranks():
    lengths = [(7 * i) % 23 + 2 for i in range(100)]
    plans = [PackedPlan(lengths, 0, 32, 2, grad_accum_steps=2, world_size=2, rank=r, seed=3) for r in (0, 1)]
    steps = plans[0].epoch_steps(0)
    assert sorted(torch.cat(steps).tolist()) == list(range(100))
    for step in steps[:-1]:
        mine = [plan.make_step(step) for plan in plans]
        micro = [mb for s in mine for mb in s.micro_batches]
        assert len(micro) == 4 and torch.equal(torch.cat(micro), step)  # rank 0: micro 0, 1; rank 1: 2, 3
        for mb in micro:
            assert plans[0].positions([lengths[i] for i in mb.tolist()]) <= 2 * 32
            rows = plans[0].collate([TokenizedExample(i, *(torch.zeros(lengths[i], dtype=torch.long),) * 2,
                                                      torch.ones(lengths[i])) for i in mb.tolist()])
            assert rows["input_ids"].shape[0] <= 2 and rows["input_ids"].shape[1] == 32  # the rows the fill counted
        assert mine[0].weight == mine[1].weight == len(step)
    other_epoch = plans[0].epoch_steps(1)
    assert not torch.equal(torch.cat(other_epoch), torch.cat(steps))  # reshuffled each epoch


def test_packing_drives_padding_toward_zero_and_is_reported(tmp_path):
    padded = fit_recording(make_trainer(tmp_path / "padded", max_epochs=1))
    packed_trainer = make_trainer(tmp_path / "packed", max_epochs=1, packing=True)
    packed = fit_recording(packed_trainer)
    mean = lambda outs: sum(o["train/padding_fraction"] for o in outs[:-1]) / (len(outs) - 1)  # noqa: E731
    assert mean(padded) > 0.3 and mean(packed) < 0.1
    # the first packed step's fraction, by hand: its examples' positions over its rows
    plan = PackedPlan(packed_trainer.lengths, 0, 48, 4, seed=0)
    step = next(iter(plan.epoch_steps(0)))
    batch = plan.collate([packed_trainer.train_data[i] for i in step.tolist()])
    real = sum(packed_trainer.lengths[i] for i in step.tolist())
    assert packed[0]["train/padding_fraction"] == pytest.approx(1 - real / batch["input_ids"].numel())
    assert all(o["perf/tokens_per_s"] > 0 for o in packed) and "optim/grad_norm" in packed[0]


def test_packed_epochs_are_counted_exactly_for_the_schedule(tmp_path):
    t = make_trainer(tmp_path, max_epochs=3, packing=True, lr_scheduler="linear")
    t.fit()
    assert t.state.global_step == t.total_steps() == sum(len(t.plan.epoch_steps(e)) for e in range(3))
    assert t.optimizer.param_groups[0]["lr"] == 0.0  # the linear schedule ended exactly at the last step


# ---- bucketing -----------------------------------------------------------------------------------


def test_bucketed_steps_sort_by_length_within_windows_and_cover_the_epoch():
    lengths = [(11 * i) % 29 + 1 for i in range(90)]
    plan = BucketedPlan(lengths, 0, window=4, batch_size=8, seed=1)
    steps = plan.epoch_steps(0)
    assert sorted(torch.cat(steps).tolist()) == list(range(90)) and len(steps) == plan.steps_per_epoch() == 12
    for step in steps:
        ls = [lengths[i] for i in step.tolist()]
        assert ls == sorted(ls, reverse=True)
    accumulated = BucketedPlan(lengths, 0, window=4, batch_size=2, grad_accum_steps=4, seed=1).epoch_steps(0)
    assert all(torch.equal(a, b) for a, b in zip(steps, accumulated))  # the same examples in every step
    padded = sum(plan.positions([lengths[i] for i in s.tolist()]) for s in steps)
    plain = sum(plan.positions([lengths[i] for i in s.tolist()]) for s in torch.split(epoch_permutation(90, 1, 0), 8))
    assert padded < 0.8 * plain


# ---- data checks -----------------------------------------------------------------------------------


def test_examples_with_nothing_to_train_are_skipped_counted_and_logged(tmp_path, caplog):
    data = sorting_examples(20)
    data[3] = {"prompt": "sort " + " ".join(["1"] * 40) + " =", "completion": " 1"}  # prompt alone exceeds max_length
    with caplog.at_level(logging.WARNING):
        t = SFTTrainer(model(), SFTConfig(max_length=24, output_dir=str(tmp_path)), tokenizer=tokenizer(),
                       train_data=data)
    assert len(t.train_data) == 19 and [i for i, _ in t.skipped["train_data"]] == [3]
    assert "skipped 1 of 20" in caplog.text and "example 3" in caplog.text
    with pytest.raises(ValueError, match="example 2: empty 'completion'"):
        SFTTrainer(model(), SFTConfig(output_dir=str(tmp_path)), tokenizer=tokenizer(),
                   train_data=[*data[:2], {"prompt": "sort 1 =", "completion": ""}])
    with pytest.raises(ValueError, match="example 0: a chat with no assistant turn"):
        SFTTrainer(model(), SFTConfig(output_dir=str(tmp_path)), tokenizer=tokenizer(),
                   train_data=[{"messages": [{"role": "user", "content": "1"}]}])


def test_jsonl_and_chat_examples_train_assistant_turns_only(tmp_path):
    import json

    path = tmp_path / "train.jsonl"
    chats = [{"messages": [{"role": "user", "content": "sort 2 1 ="}, {"role": "assistant", "content": "1 2"}]}] * 4
    path.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    t = SFTTrainer(model(), SFTConfig(max_length=24, batch_size=2, output_dir=str(tmp_path)), tokenizer=tokenizer(),
                   train_data=str(path))
    tok = tokenizer()
    e = t.train_data[0]
    trained = e.target_tokens[e.weights > 0].tolist()
    assert tok.convert_ids_to_tokens(trained) == ["1", "2", "<|end|>"]
    assert tok.convert_tokens_to_ids("<|end|>") in default_stop_token_ids(tok, t.unwrapped_model)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="pack_length"):
        SFTConfig(max_length=64, packing=True, pack_length=32)
    with pytest.raises(ConfigError, match="pack_length: 128 .* packing is off"):  # not silently ignored
        SFTConfig(max_length=64, pack_length=128)
    with pytest.raises(ConfigError, match="bucket_window"):
        SFTConfig(packing=True, bucket_window=8)
    with pytest.raises(ConfigError, match="max_length"):
        load_config(SFTConfig, None, ["max_length=0"])
    assert load_config(SFTConfig, None, ["lora.r=4"]).lora.r == 4
    assert SFTConfig(lora={"r": 2}).lora.r == 2
    assert SFTConfig(max_length=64, packing=True).row_length == 128


# ---- validation -------------------------------------------------------------------------------------


def test_validation_is_the_token_mean_and_exact_match_is_what_greedy_generation_reproduces(tmp_path):
    scored = []

    def exact(example, text):
        scored.append(text)
        return float(text.split() == example["completion"].split())

    val = sorting_examples(24, seed=5, max_digits=3)
    t = SFTTrainer(model(), SFTConfig(max_length=24, batch_size=16, max_epochs=8, lr=1e-2, output_dir=str(tmp_path)),
                   tokenizer=tokenizer(), train_data=sorting_examples(200, max_digits=3), val_data=val, eval_fn=exact)
    t.fit()
    metrics = t.validate()
    assert metrics["val/loss"] == pytest.approx(naive_step_loss(t.unwrapped_model, t.val_data), rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]))
    assert 0 < metrics["val/exact_match"] < 1  # partly learned: the comparison below means something
    assert metrics["val/score"] == pytest.approx(metrics["val/exact_match"])
    assert len(scored) == 24 * (8 + 1)


def test_an_eval_fn_that_raises_or_returns_no_number_is_an_error_naming_the_example(tmp_path):
    val = sorting_examples(4, seed=5)
    for eval_fn, error, words in ((lambda example, text: float("nan"), ValueError, "eval_fn returned nan"),
                                  (lambda example, text: None, ValueError, "eval_fn returned None"),
                                  (lambda example, text: 1 / 0, RuntimeError, "eval_fn raised ZeroDivisionError")):
        t = SFTTrainer(model(), SFTConfig(max_length=24, output_dir=str(tmp_path)), tokenizer=tokenizer(),
                       train_data=sorting_examples(8), val_data=val, eval_fn=eval_fn)
        with pytest.raises(error, match=rf"{words} on validation example 0 \(generated "):
            t.validate()


# ---- checkpoints and resume -----------------------------------------------------------------------


def test_checkpoint_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = make_trainer(tmp_path, max_epochs=1)
    t.fit()
    path = t.save_checkpoint()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("sort 3 1 =")["input_ids"]])
    assert ids.tolist() == [tokenizer()("sort 3 1 =")["input_ids"]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, t.unwrapped_model(ids).logits, rtol=0, atol=0)


def test_save_model_writes_the_model_with_its_tokenizer(tmp_path):
    """The trained model, saved for use elsewhere, loads with its tokenizer: a bare save_pretrained of the model
    left AutoTokenizer.from_pretrained failing on a folder without one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = make_trainer(tmp_path, max_steps=2)
    t.fit()
    folder = t.save_model(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("sort 3 1 =")["input_ids"] == tokenizer()("sort 3 1 =")["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "1"}], tokenize=False) == \
        tokenizer().apply_chat_template([{"role": "user", "content": "1"}], tokenize=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in t.unwrapped_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_writes_no_progress_bar_and_leaves_the_users_setting(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    t = make_trainer(tmp_path, max_steps=1)
    t.fit()
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    t.save_checkpoint()
    assert "Writing model shards" not in capfd.readouterr().err  # transformers draws one per save otherwise
    assert hf_logging.is_progress_bar_enabled()


# Killed at the start of a step; the last checkpoint (every 2 steps) is mid-epoch 1 (packed: 3 steps an
# epoch, from step 4; bucketed: 4 steps an epoch, from step 6), so the resume replays a step in the middle.
@pytest.mark.parametrize("packing,kill_at", [(True, 5), (False, 7)], ids=["packed", "bucketed"])
def test_sigkill_mid_epoch_with_accumulation_resumes_bitwise(tmp_path, packing, kill_at):
    flags = ["--packing"] if packing else ["--bucket-window", "3"]
    proc = run_worker(WORKER, "--out", tmp_path / "killed", *flags, "--kill-at", kill_at, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = sft_worker_trainer(tmp_path / "killed", packing)
    resumed.fit(resume="latest")
    assert resumed.state.global_step == 2 * resumed.plan.steps_per_epoch()
    straight = sft_worker_trainer(tmp_path / "straight", packing)
    straight.fit()
    assert_bitwise_equal(weights(resumed.model), weights(straight.model))
    assert_bitwise_equal(optimizer_tensors(resumed), optimizer_tensors(straight))
    assert resumed.state.train_loss_history == straight.state.train_loss_history
    assert resumed.state.global_step == straight.state.global_step


def sft_worker_trainer(out, packing):
    from tests.lm.resume_worker import build

    return build(out, packing=packing, bucket_window=0 if packing else 3)


def test_a_resume_with_other_data_tokenizer_or_settings_is_refused_naming_what_differs(tmp_path):
    """The same count of examples but other ones, a tokenizer of the same size but other ids, or a setting
    that shapes the loss: a resume would silently continue another run. Each is refused, naming it."""
    from paperloop import CheckpointError
    from paperloop.models import word_level_tokenizer

    stop = StopAt(3)
    make_trainer(tmp_path, n=32, callbacks=[stop], checkpoint_every_steps=3).fit()
    swapped = word_level_tokenizer(list(reversed(tokenizer_vocab())))  # same size, other ids
    cases = {"tokenizer": dict(tokenizer=swapped), "train_data": dict(train_data=sorting_examples(32, seed=9)),
             "config: train_prompt": dict(train_prompt=True), "config: max_length": dict(max_length=20),
             "config: packing": dict(packing=True)}  # was "no entry 'row_len'"
    for words, change in cases.items():
        settings = dict(max_length=24, batch_size=8, max_epochs=2, lr=3e-3, output_dir=str(tmp_path),
                        checkpoint_every_steps=3)
        tok, data = change.pop("tokenizer", tokenizer()), change.pop("train_data", sorting_examples(32))
        trainer = SFTTrainer(model(), SFTConfig(**{**settings, **change}), tokenizer=tok, train_data=data)
        with pytest.raises(CheckpointError, match=words):
            trainer.fit(resume="latest")
    make_trainer(tmp_path, n=32, checkpoint_every_steps=3).fit(resume="latest")  # the same run: it goes on


def tokenizer_vocab():
    from tests.support.lm import VOCAB

    return VOCAB


# ---- what a broken feature would get past (mutation survivors of round 3) --------------------------


def test_tokens_per_s_counts_trained_tokens_not_examples(tmp_path, monkeypatch):
    import paperloop.lm.sft as sft

    clock = {"now": 0.0}

    def tick():
        clock["now"] += 0.5  # train_step reads the clock twice a step: every step takes exactly 0.5 s
        return clock["now"]

    monkeypatch.setattr(sft, "time", type("Clock", (), {"perf_counter": staticmethod(tick)}))
    t = make_trainer(tmp_path, max_epochs=1)
    steps = []
    t.callbacks.append(LambdaCallback(on_batch_begin=lambda tr, step: steps.append(step)))
    outputs = fit_recording(t)
    for step, o in zip(steps, outputs):
        trained = sum(t.train_data[i].num_trained for i in torch.cat(step.micro_batches).tolist())
        assert o["perf/tokens_per_s"] == pytest.approx(trained / 0.5)
        assert trained > 2 * step.samples  # so a count of examples would be far off


def test_packed_plan_counts_each_epochs_own_steps_for_the_schedule():
    """Packed epochs differ in length (the order changes how examples fit): sized from one epoch's count, a
    schedule would end early or late."""
    lengths = [(7 * i) % 23 + 2 for i in range(60)]
    plan = next(p for p in (PackedPlan(lengths, 0, 32, 2, seed=s) for s in range(50))
                if len({len(p.epoch_steps(e)) for e in range(3)}) > 1)  # a seed whose epochs differ
    counts = [len(plan.epoch_steps(e)) for e in range(3)]
    assert plan.total_steps(3) == sum(counts) != 3 * counts[0]


def test_bucketed_steps_come_in_a_shuffled_order_each_epoch():
    """Each window is sorted longest first; the steps themselves are then shuffled, or every epoch would run
    from the longest steps to the shortest in each window, the same way each time."""
    lengths = [(11 * i) % 29 + 1 for i in range(96)]
    plan = BucketedPlan(lengths, 0, window=12, batch_size=8, seed=1)  # one window: the whole epoch
    longest = [[max(lengths[i] for i in s.tolist()) for s in plan.epoch_steps(e)] for e in range(2)]
    assert longest[0] != sorted(longest[0], reverse=True)  # not the window's longest-first order
    assert [s.tolist() for s in plan.epoch_steps(0)] != [s.tolist() for s in plan.epoch_steps(1)]


def test_validation_prompts_plus_eval_max_new_tokens_are_checked_against_a_learned_context(tmp_path):
    """Generation for eval_fn runs past the validation examples' length: a learned position table (GPT-2) must hold
    the longest prompt plus eval_max_new_tokens, or greedy decoding would index past it hours into a run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer()
    examples = [{"prompt": "sort 3 1 =", "completion": " 1 3"}] * 8
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=12, n_embd=16, n_layer=1, n_head=2))

    def build(eval_max_new_tokens):
        return SFTTrainer(gpt2, SFTConfig(max_length=12, batch_size=4, output_dir=str(tmp_path),
                                          eval_max_new_tokens=eval_max_new_tokens),
                          tokenizer=tok, train_data=examples, val_data=examples, eval_fn=lambda *a: 1.0)
    build(eval_max_new_tokens=4)  # "<bos> sort 3 1 =" is 5 tokens: 9 positions fit in 12
    with pytest.raises(ValueError, match="the longest validation prompt plus eval_max_new_tokens is 13 positions, "
                                         "more than the model's max_position_embeddings=12"):
        build(eval_max_new_tokens=8)

"""Off-policy distillation (`SFTTrainer(teacher=...)`, `lm.distill`): every divergence and its gradient against a
naive reference over both models' full logits (in chunks of a few rows), top-k with k = V as forward KL, a teacher
that is the student (divergence 0), the step's loss and update independent of its micro-batch split, packing, LoRA,
bitwise resume after SIGKILL, and what a teacher must be (the student's tokenizer and vocabulary; the same teacher on
resume); the generalized JSD against TRL's on fixed inputs."""

import json
from pathlib import Path

import pytest
import torch

from paperloop import CheckpointError, ConfigError, SFTConfig, SFTTrainer
from paperloop.callbacks import LambdaCallback
from paperloop.lm import distill, pad_token_id
from paperloop.lm.data import pad_batch, tokenize_examples
from paperloop.lm.distill import chunked_distillation, distill_loss, divergence_fn
from paperloop.lm.losses import output_hidden
from paperloop.models import tiny_causal_lm
from tests.support.engine import assert_bitwise_equal, optimizer_tensors, weights
from tests.support.lm import VOCAB, model, sorting_examples, tokenizer
from tests.support.workers import run_worker

WORKER = Path(__file__).with_name("resume_worker.py")
V = len(VOCAB) + 8  # the tiny models' vocabulary (tests.support.lm.model)


def teacher(seed: int = 3):
    """A teacher of other weights and another width than the student (hidden 32), its output layer scaled up: a
    random tiny model's next-token distribution is near uniform, this one's is peaked, as a trained model's is."""
    built = model(hidden_size=48, seed=seed)
    with torch.no_grad():
        built.lm_head.weight.mul_(40)
    return built


def batch_of(n: int = 6) -> dict:
    tok = tokenizer()
    examples, _ = tokenize_examples(sorting_examples(n), tok, 24, False, False)
    return pad_batch(examples, pad_token_id(tok))


def naive(name, student, teacher_, batch, **settings):
    """(divergence (N,), log p(target) (N,)) at the trained positions from both models' full (B, T, V) logits, the
    divergence written out from its definition."""
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    trained = batch["weights"] != 0
    lp = student(**kwargs).logits.double().log_softmax(-1)[trained]
    with torch.no_grad():
        lq = teacher_(**kwargs).logits.double().log_softmax(-1)[trained]
    p, q = lp.exp(), lq.exp()
    if name == "forward_kl" or (name == "jsd" and settings["beta"] == 0):
        div = (q * (lq - lp)).sum(-1)
    elif name == "jsd" and settings["beta"] == 1:
        div = (p * (lp - lq)).sum(-1)
    elif name == "jsd":
        b = settings["beta"]
        m = b * q + (1 - b) * p
        div = b * (q * (lq - m.log())).sum(-1) + (1 - b) * (p * (lp - m.log())).sum(-1)
    elif name == "top_k_renormalized":  # the Tinker cookbook's: cross-entropy on the renormalized top k, less its entropy
        q_k, ids = q.topk(settings["top_k"], -1)
        q_k = q_k / q_k.sum(-1, keepdim=True)
        div = -(q_k * lp.gather(1, ids)).sum(-1) + (q_k * q_k.log()).sum(-1)
    else:  # top_k: the teacher's k best tokens, one bucket each, and a tail bucket for the rest, in both
        q_k, ids = q.topk(settings["top_k"], -1)
        p_k = p.gather(1, ids)
        q_tail, p_tail = 1 - q_k.sum(-1), 1 - p_k.sum(-1)
        div = (q_k * (q_k.log() - p_k.log())).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
    return div, lp.gather(1, batch["target_tokens"][trained][:, None]).squeeze(1)


CASES = [("forward_kl", {}), ("top_k", {"top_k": 4}), ("top_k_renormalized", {"top_k": 4}), ("jsd", {"beta": 0.3}),
         ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})]


class Wrapped(torch.nn.Sequential):
    """An output layer that is not a plain nn.Linear (as a LoRA-wrapped one is not): the chunks go through autograd."""


@pytest.mark.parametrize("path", ["fused", "fused, a bias", "autograd"])
@pytest.mark.parametrize("name, settings", CASES, ids=[f"{n}{s}" for n, s in CASES])
def test_each_divergence_and_its_gradient_are_a_naive_full_logits_references(name, settings, path, monkeypatch):
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 5 * V)  # 5 rows a chunk: several chunks, a short last one
    student, teacher_, batch = model().double(), teacher().double(), batch_of()
    if path == "autograd":
        student.lm_head = Wrapped(student.lm_head)
    if path == "fused, a bias":
        head = torch.nn.Linear(32, V, bias=True, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(student.lm_head.weight)
            head.bias.normal_(generator=torch.Generator().manual_seed(1))
        student.lm_head = head
    weight, fn = 0.4, divergence_fn(name, **settings)
    ours = distill_loss(student, teacher_, batch, fn, weight)
    ours_grads = torch.autograd.grad(ours["loss"], list(student.parameters()))
    div, lp = naive(name, student, teacher_, batch, **settings)
    loss = (1 - weight) * -lp.mean() + weight * div.mean()
    ref_grads = torch.autograd.grad(loss, list(student.parameters()))
    torch.testing.assert_close(ours["loss"].detach(), loss.detach(), rtol=0, atol=1e-12)
    assert ours["distill/kl"].item() == pytest.approx(div.mean().item(), abs=1e-12)
    assert ours["distill/nll"].item() == pytest.approx(-lp.mean().item(), abs=1e-12)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with torch.no_grad():  # each position's divergence, not only their mean
        s, t = output_hidden(student, batch), output_hidden(teacher_, batch)
        n = len(s.targets_N)
        _, div_N, _ = chunked_distillation(s.hidden_N_H, s.logits_fn, t.hidden_N_H, t.logits_fn, s.targets_N, fn,
                                           torch.ones(n), torch.zeros(n))
    torch.testing.assert_close(div_N, div.detach(), rtol=0, atol=1e-12)
    assert div.min() > 1e-3  # the two models differ: the divergence is not trivially 0


TRL = json.loads(Path(__file__).with_name("trl_distill_reference.json").read_text())


@pytest.mark.parametrize("beta", [case["beta"] for case in TRL["cases"]])
def test_the_generalized_jsd_and_its_gradient_are_trls(beta):
    """TRL's GKDTrainer.generalized_jsd_loss (`batchmean` over the labelled positions), by make_trl_distill_reference.py,
    against ours on the same logits (given whole: no output layer)."""
    case = next(c for c in TRL["cases"] if c["beta"] == beta)
    student = torch.tensor(TRL["student"], dtype=torch.float64, requires_grad=True)
    kept = torch.tensor(TRL["labels"]) != -100
    n = int(kept.sum())
    loss, _, _ = chunked_distillation(student[kept], None, torch.tensor(TRL["teacher"], dtype=torch.float64)[kept],
                                      None, torch.zeros(n, dtype=torch.long), divergence_fn("jsd", beta=beta),
                                      torch.full((n,), 1 / n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], rel=1e-12, abs=1e-12)
    torch.testing.assert_close(student.grad, torch.tensor(case["grad"], dtype=torch.float64), rtol=0, atol=1e-12)
    assert case["loss"] > 0.05


def test_top_k_either_way_with_k_equal_to_the_vocabulary_is_the_forward_kl():
    student, teacher_, batch = model().double(), teacher().double(), batch_of()
    results = []
    for name, settings in (("forward_kl", {}), ("top_k", {"top_k": V}), ("top_k_renormalized", {"top_k": V})):
        loss = distill_loss(student, teacher_, batch, divergence_fn(name, **settings), 1.0)["loss"]
        results.append((loss.detach(), torch.autograd.grad(loss, list(student.parameters()))))
    (kl, kl_grads), *tops = results
    for top, top_grads in tops:
        torch.testing.assert_close(top, kl, rtol=0, atol=1e-12)
        for a, b in zip(top_grads, kl_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # fewer tokens than the vocabulary is another divergence (the test above would pass a top_k ignoring k)
    for name in ("top_k", "top_k_renormalized"):
        fewer = distill_loss(student, teacher_, batch, divergence_fn(name, top_k=3), 1.0)["loss"]
        assert abs(fewer.item() - kl.item()) > 1e-3


def test_neither_models_output_layer_ever_makes_more_than_one_chunk_of_logits(tmp_path, monkeypatch):
    """What would fail if either model's logits were made whole: the models' own forwards make two rows of logits
    (the output layer's check), and every chunk of either (the student's through `_chunk_logits`, the teacher's
    through its output layer) at most CHUNK_ELEMENTS."""
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 5 * V)
    chunks, make_chunk = [], distill._chunk_logits
    monkeypatch.setattr(distill, "_chunk_logits", lambda *a: chunks.append(make_chunk(*a)[0].numel()) or make_chunk(*a))
    trainer = make(tmp_path, n=16, max_steps=2, distill="jsd")
    rows = {"student": [], "teacher": []}
    for who, lm in (("student", trainer.unwrapped_model), ("teacher", trainer.teacher)):
        lm.lm_head.register_forward_hook(lambda module, args, out, who=who: rows[who].append(out.numel() // V))
    trainer.fit()
    assert max(rows["student"]) == 2 and len(rows["teacher"]) > 10 and max(rows["teacher"]) <= 5, rows
    assert len(chunks) > 10 and max(chunks) <= 5 * V


def record(trainer) -> list[dict]:
    outputs = []
    trainer.callbacks.append(LambdaCallback(on_batch_end=lambda t, o: outputs.append(
        {k: float(v) for k, v in o.items() if k in ("train/loss", "distill/kl", "distill/nll")})))
    trainer.fit()
    return outputs


def make(out, student=None, teacher_=None, n=32, **cfg) -> SFTTrainer:
    settings = dict(max_length=24, batch_size=8, max_epochs=1, lr=3e-3, output_dir=str(out))
    settings.update(cfg)
    return SFTTrainer(student if student is not None else model(), SFTConfig(**settings), tokenizer=tokenizer(),
                      train_data=sorting_examples(n), teacher=teacher_ if teacher_ is not None else teacher())


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_a_teacher_that_is_the_student_gives_divergence_zero(tmp_path, name):
    outputs = record(make(tmp_path, teacher_=model(), distill=name, max_steps=1))
    assert abs(outputs[0]["distill/kl"]) < 1e-6
    assert outputs[0]["distill/nll"] > 1.0  # the hard-label part is there all the same


class SGDTrainer(SFTTrainer):
    """Plain SGD shows any error in the gradient's scale (Adam would normalize most of it away)."""

    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr)


def test_a_step_of_1x8_and_of_4x2_micro_batches_give_the_same_loss_and_update(tmp_path):
    """Examples of 1 to 9 trained tokens: a per-micro-batch mean would weigh them otherwise."""
    runs = []
    for batch_size, accum in ((8, 1), (2, 4)):
        trainer = SGDTrainer(model().double(), SFTConfig(
            max_length=24, batch_size=batch_size, grad_accum_steps=accum, lr=0.5, max_epochs=1, distill="top_k",
            distill_top_k=3, distill_weight=0.5, output_dir=str(tmp_path / str(accum))), tokenizer=tokenizer(),
            train_data=sorting_examples(24), teacher=teacher().double())
        runs.append((trainer, record(trainer)))
    (big, big_out), (small, small_out) = runs
    for key in ("train/loss", "distill/kl", "distill/nll"):
        assert [o[key] for o in small_out] == pytest.approx([o[key] for o in big_out], rel=1e-6, abs=1e-6)
    moved = 0.0
    for (name, a), b in zip(weights(big.model).items(), weights(small.model).values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        moved = max(moved, float((a - weights(model().double())[name]).abs().max()))
    assert moved > 1e-2  # the updates are large enough for a mis-scaled micro-batch to show


def test_packed_rows_distill_as_padded_ones(tmp_path):
    """Packing changes the rows, not the loss: each example sees only itself, in both models."""
    losses_ = [record(make(tmp_path / str(packing), n=16, max_steps=1, packing=packing, batch_size=16))[0]
               for packing in (False, True)]
    assert losses_[1]["distill/kl"] == pytest.approx(losses_[0]["distill/kl"], rel=1e-5)
    assert losses_[1]["train/loss"] == pytest.approx(losses_[0]["train/loss"], rel=1e-5)


def test_distillation_moves_a_lora_student_toward_the_teacher(tmp_path):
    """The adapters (on the output layer too: its chunks then go through autograd, not a plain nn.Linear) train, the
    base stays; the divergence falls (measured: 2.36 -> 1.0-1.5 nats over 12 steps at lr 3e-2; asked: 0.5)."""
    lora = {"r": 8, "alpha": 16, "target_modules": ("q_proj", "v_proj", "lm_head")}
    trainer = make(tmp_path, n=48, max_epochs=2, lr=3e-2, lora=lora, batch_size=8)
    outputs = record(trainer)
    kl = [o["distill/kl"] for o in outputs]
    assert sum(kl[-3:]) / 3 < kl[0] - 0.5, kl
    assert all(o["train/loss"] == pytest.approx(o["distill/kl"]) for o in outputs)  # distill_weight 1: the KL alone
    base = trainer.unwrapped_model.get_base_model()
    with trainer.unwrapped_model.disable_adapter():
        assert torch.equal(base.lm_head.base_layer.weight, model().lm_head.weight)


# Killed at the start of step 5; the last checkpoint (every 2 steps) is step 4, mid-epoch 1 (3 packed steps an epoch).
def test_sigkill_mid_epoch_resumes_bitwise_and_another_teacher_is_refused(tmp_path):
    from tests.lm.resume_worker import build

    proc = run_worker(WORKER, "--out", tmp_path / "killed", "--packing", "--teacher", "--kill-at", 5, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed = build(tmp_path / "killed", packing=True, teacher=True)
    resumed.fit(resume="latest")
    straight = build(tmp_path / "straight", packing=True, teacher=True)
    straight.fit()
    assert resumed.state.global_step == straight.state.global_step == 2 * straight.plan.steps_per_epoch()
    assert_bitwise_equal(weights(resumed.model), weights(straight.model))
    assert_bitwise_equal(optimizer_tensors(resumed), optimizer_tensors(straight))
    assert resumed.state.train_loss_history == straight.state.train_loss_history
    other = build(tmp_path / "killed", packing=True, teacher=True, teacher_seed=4)
    with pytest.raises(CheckpointError, match="teacher: this run's teacher is not the one the checkpointed run used"):
        other.fit(resume="latest")


def test_what_a_teacher_must_be_and_the_settings_are_checked_when_built(tmp_path):
    swapped = tokenizer()
    swapped.add_tokens(["<x>"])  # one token more: the teacher's vocabulary differs
    with pytest.raises(ValueError, match="teacher: its tokenizer is not the student's: token '<x>'"):
        SFTTrainer(model(), SFTConfig(max_length=24, output_dir=str(tmp_path)), tokenizer=tokenizer(),
                   train_data=sorting_examples(8), teacher=teacher(), teacher_tokenizer=swapped)
    wider = tiny_causal_lm(V + 4, hidden_size=48, num_layers=2, num_heads=2, seed=3)
    with pytest.raises(ValueError, match=f"teacher: its vocab_size is {V + 4} and the student's {V}"):
        make(tmp_path, teacher_=wider)
    with pytest.raises(ConfigError, match="distill_weight, distill_top_k: set, but no teacher"):
        SFTTrainer(model(), SFTConfig(max_length=24, output_dir=str(tmp_path), distill="top_k", distill_weight=0.5,
                                      distill_top_k=5), tokenizer=tokenizer(), train_data=sorting_examples(8))
    with pytest.raises(ConfigError, match="distill_beta: set, but distill='top_k' does not read it"):
        SFTConfig(distill="top_k", distill_beta=0.2)
    with pytest.raises(ConfigError, match="distill: unknown divergence 'kl'"):
        SFTConfig(distill="kl")
    for key, value in (("distill_weight", 1.5), ("distill_top_k", 0), ("distill_beta", -0.1)):
        with pytest.raises(ConfigError, match=key):
            SFTConfig(**{key: value, "distill": "jsd" if key == "distill_beta" else "top_k"})
    trainer = make(tmp_path, max_steps=1)
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())

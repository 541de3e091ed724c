"""SFT beyond the default path: LoRA adapters (peft) with adapter-only checkpoints that resume exactly and merge
into a plain transformers folder; torch.compile with its compile time kept out of throughput; two processes."""

import json
from pathlib import Path

import pytest
import torch

from tests.support.callbacks import StopAt
from tests.support.engine import assert_bitwise_equal, optimizer_tensors, weights
from tests.support.workers import run_worker
from paperloop import ConfigError, SFTConfig, SFTTrainer
from paperloop.callbacks import LambdaCallback
from paperloop.cli import main as cli
from tests.support.lm import VOCAB, make_trainer, model, sorting_examples, tokenizer

# ---- LoRA ----------------------------------------------------------------------------------------------


def lora_trainer(out, callbacks=(), **cfg):
    pytest.importorskip("peft")
    settings = dict(lora={"r": 4, "alpha": 8, "dropout": 0.1}, lr=1e-2, max_epochs=2, checkpoint_every_steps=3)
    settings.update(cfg)
    return make_trainer(out, n=48, callbacks=callbacks, **settings)


def test_lora_trains_adapters_only_and_checkpoints_hold_only_them(tmp_path):
    t = lora_trainer(tmp_path)
    before = {k: v.clone() for k, v in model().state_dict().items()}
    t.fit()
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    base = t.unwrapped_model.get_base_model()
    for name, value in base.state_dict().items():  # every frozen weight is as it was built
        if "lora_" not in name:
            assert torch.equal(value, before[name.replace(".base_layer", "")]), name
    files = {p.name for p in (tmp_path / "checkpoints" / "step-000006").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    assert (tmp_path / "base_model" / "config.json").is_file()  # the in-memory base, written once for merging


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same_weights(tmp_path, lora):
    """Checkpointing changes memory, not the numbers: the trained weights equal the run without it, bitwise, and
    with LoRA the adapters train (a reentrant checkpoint with frozen inputs would silently leave them as they
    were); the decoder layers really run a second time, in the backward."""
    build = lora_trainer if lora else make_trainer
    plain = build(tmp_path / "plain", max_epochs=1)
    plain.fit()
    checkpointed = build(tmp_path / "checkpointed", max_epochs=1, gradient_checkpointing=True)
    initial = {n: p.detach().clone() for n, p in checkpointed.model.named_parameters() if p.requires_grad}
    transformer = checkpointed.unwrapped_model
    transformer = transformer.get_base_model() if lora else transformer
    calls = []
    # counted by a call inside the layer (module hooks do not run again in the recompute)
    activation = transformer.model.layers[0].mlp.act_fn
    activation.forward = lambda x, forward=activation.forward: calls.append(1) or forward(x)
    checkpointed.fit()
    assert len(calls) == 2 * checkpointed.state.global_step > 0
    trained = {n: p for n, p in checkpointed.model.named_parameters() if p.requires_grad}
    assert trained.keys() == initial.keys() and all(("lora_" in n) == lora or not lora for n in trained)
    assert all(not torch.equal(trained[n], initial[n]) for n in trained if "lora_A" not in n)  # B starts at 0
    assert_bitwise_equal(weights(checkpointed.unwrapped_model), weights(plain.unwrapped_model))


def test_an_output_dir_that_cannot_hold_the_lora_base_is_a_config_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"^output_dir: {blocker / 'run'} cannot hold the LoRA base model folder "
                                          r"\(Not a directory\)"):
        lora_trainer(blocker / "run")
    assert blocker.read_text() == "not a folder"

    import errno
    from transformers import PreTrainedModel

    def full_disk(self, folder, **kwargs):  # writes part of the base, then the disk is full
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(ConfigError, match=r"cannot hold the LoRA base model folder \(No space left on device\)"):
        lora_trainer(tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []  # no half-written base left behind


def test_the_adapters_initial_weights_follow_the_seed_not_the_global_rng(tmp_path):
    """peft draws lora_A from the global RNG; a rebuilt trainer (a resume in a new process, a straight run beside
    a stopped one) must start from the same adapters, and the caller's RNG is left as it was."""
    torch.manual_seed(1)
    first = lora_trainer(tmp_path / "a")
    after = torch.rand(1)
    torch.manual_seed(1)
    torch.rand(5)  # another global RNG state
    second = lora_trainer(tmp_path / "b")
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))  # building the first drew nothing from the caller's stream
    lora = {k: v for k, v in first.unwrapped_model.state_dict().items() if "lora_A" in k}
    assert lora and all(torch.equal(v, second.unwrapped_model.state_dict()[k]) for k, v in lora.items())
    other = lora_trainer(tmp_path / "c", seed=1)
    assert not torch.equal(next(iter(lora.values())), other.unwrapped_model.state_dict()[next(iter(lora))])


def test_lora_resumes_bitwise_from_an_adapter_checkpoint(tmp_path):
    lora_trainer(tmp_path / "stopped", callbacks=[StopAt(4, checkpoint=True)]).fit()
    resumed = lora_trainer(tmp_path / "stopped")
    resumed.fit(resume="latest")
    straight = lora_trainer(tmp_path / "straight")
    straight.fit()
    assert_bitwise_equal(weights(resumed.model), weights(straight.model))
    assert_bitwise_equal(optimizer_tensors(resumed), optimizer_tensors(straight))
    assert resumed.state.train_loss_history == straight.state.train_loss_history


def test_a_changed_base_is_refused_on_resume(tmp_path):
    lora_trainer(tmp_path, max_epochs=1).fit()
    with pytest.raises(ValueError, match="another base model"):
        SFTTrainer(model(seed=1), SFTConfig(max_length=24, lora={"r": 4}, output_dir=str(tmp_path)),
                   tokenizer=tokenizer(), train_data=sorting_examples(8))


def test_a_base_with_tied_embeddings_is_recognised_as_itself_and_a_changed_one_refused(tmp_path):
    from paperloop.lm.lora import save_base_model
    from paperloop.models import tiny_causal_lm

    def tied(seed):
        return tiny_causal_lm(len(VOCAB) + 8, hidden_size=32, num_layers=1, num_heads=2, seed=seed,
                              tie_word_embeddings=True)

    save_base_model(tied(0), tmp_path / "base")  # save_pretrained stores the tied head once
    save_base_model(tied(0), tmp_path / "base")  # the same base again (a resume): accepted
    with pytest.raises(ValueError, match="another base model"):
        save_base_model(tied(1), tmp_path / "base")


def test_merge_writes_a_plain_model_that_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = lora_trainer(tmp_path / "run", max_epochs=1)
    t.fit()
    checkpoint = t.save_checkpoint()
    assert cli(["merge", str(checkpoint), str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "merged")("sort 3 1 =")["input_ids"]])
    t.unwrapped_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, t.unwrapped_model(ids).logits, rtol=0, atol=1e-5)
    assert cli(["merge", str(make_full_checkpoint(tmp_path / "full")), str(tmp_path / "x")]) == 2  # not LoRA


def make_full_checkpoint(out):
    t = make_trainer(out, n=16, max_epochs=1)
    t.fit()
    return t.save_checkpoint()


# ---- compile ------------------------------------------------------------------------------------------


def test_compile_matches_eager_and_keeps_compile_time_out_of_throughput(tmp_path, monkeypatch):
    import paperloop.lm.sft as sft

    # The same dynamo graphs without inductor's code generation (minutes on this CPU).
    monkeypatch.setattr(sft, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        outputs = []
        t = make_trainer(tmp_path / str(compiled), n=32, max_epochs=1, compile=compiled,
                         callbacks=[LambdaCallback(on_batch_end=lambda tr, o: outputs.append(o))])
        t.fit()
        runs[compiled] = (t, outputs)
    (eager, eager_out), (comp, comp_out) = runs[False], runs[True]
    assert [float(o["train/loss"]) for o in comp_out] == pytest.approx([float(o["train/loss"]) for o in eager_out],
                                                                         rel=1e-5)
    assert "time/compile_s" in comp_out[0] and "perf/tokens_per_s" not in comp_out[0]
    assert all("perf/tokens_per_s" in o for o in comp_out[1:])  # dynamic shapes: no recompile per length
    assert comp.compile_seconds > 0 and list(comp.unwrapped_model.state_dict()) == list(eager.unwrapped_model.state_dict())


# ---- two processes -----------------------------------------------------------------------------------

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_match_one_process_padded_packed_and_distilling(tmp_path):
    proc = run_worker(WORKER, "--out", tmp_path, processes=2, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tests.lm.ddp_worker import KD, build, teacher
    from safetensors.torch import load_file

    for name, single_cfg in (("padded", dict(batch_size=8)), ("packed", dict(packing=True, grad_accum_steps=2)),
                             ("kd", dict(batch_size=8, **KD, teacher=teacher()))):
        # 2 processes of batch 4 = 1 of batch 8; packed: 2 processes x 1 micro-batch = 1 process x 2; with a
        # teacher, the step's divergence (distill/kl) is every process's too
        losses = []
        single = build(tmp_path / f"single-{name}", callbacks=[LambdaCallback(
            on_batch_end=lambda t, o: losses.append([float(o[k]) for k in ("train/loss", "distill/kl") if k in o]))],
            **single_cfg)
        single.fit()
        ddp = load_file(str(tmp_path / f"{name}.safetensors"))
        for k, v in weights(single.model).items():
            torch.testing.assert_close(ddp[k], v, rtol=0, atol=1e-6)
        ddp_losses = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(ddp_losses[0]) == (2 if name == "kd" else 1)
        assert [x for step in ddp_losses for x in step] == pytest.approx([x for step in losses for x in step], rel=1e-6)

"""Language models on one CUDA device (skipped without one; `benchmarks/gpu.sh` runs them on a GPU machine): sampling
from a checkpointed generator on the device, an RL run resumed exactly there, and the chunked output layer's peak
memory (`torch.cuda.max_memory_allocated`).

`python -m tests.lm.test_cuda` runs what the CPU can check of the same code (the memory check needs CUDA)."""

import pytest
import torch

from tests.support.callbacks import StopAt
from tests.support.rl import make_lm, make_prompts, make_rl_trainer, make_tokenizer
from paperloop.lm.losses import CHUNK_ELEMENTS, forward_logprobs
from paperloop.lm.sampling import sample
from paperloop.models.lm import tiny_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_sampling_from_a_checkpointed_generator(device: str):
    """Samples are a function of the generator's state on the device: restored to a saved state, the generator
    draws the same completions again, and a different state draws others."""
    tok = make_tokenizer()
    model = make_lm(tok).to(device)
    prompts = [tok(p["prompt"])["input_ids"] for p in make_prompts(4)]
    generator = torch.Generator(device=device).manual_seed(0)
    draw = dict(num_samples=4, max_new_tokens=6, generator=generator, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    sample(model, prompts, **draw)  # the stream moves on
    saved = generator.get_state()
    first = sample(model, prompts, **draw)
    second = sample(model, prompts, **draw)
    generator.set_state(saved)
    again = sample(model, prompts, **draw)
    assert again.completions() == first.completions() and torch.equal(again.logprobs_N_L, first.logprobs_N_L)
    assert again.tokens_N_L.device.type == device and second.completions() != first.completions()


def check_rl_resume(tmp_path, device: str):
    """RLTrainer samples from its own generator on the model's device, checkpointed: stopped at step 3 and resumed
    from its checkpoint at step 2, it ends on the straight run's weights and generator state, bitwise."""
    straight = make_rl_trainer(tmp_path / "straight", prompts=16, checkpoint_every_steps=2)
    straight.fit()
    assert straight.sampling_generator.device.type == device
    make_rl_trainer(tmp_path / "resumed", prompts=16, checkpoint_every_steps=2, callbacks=[StopAt(3)]).fit()
    resumed = make_rl_trainer(tmp_path / "resumed", prompts=16, checkpoint_every_steps=2)
    resumed.fit(resume="latest")
    for name, value in straight.unwrapped_model.state_dict().items():
        assert value.device.type == device and torch.equal(resumed.unwrapped_model.state_dict()[name], value), name
    assert torch.equal(resumed.sampling_generator.get_state(), straight.sampling_generator.get_state())
    assert resumed.state.train_loss_history == straight.state.train_loss_history


def lm_batch(B: int, T: int, V: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (B, T + 1), generator=g)
    return {"input_ids": ids[:, :-1].to(device), "target_tokens": ids[:, 1:].to(device),
            "position_ids": torch.arange(T).expand(B, T).to(device), "weights": torch.ones(B, T, device=device)}


def check_chunked_output_layer_memory(device: str):
    """A vocabulary of 32,000 over 8 x 512 trained tokens: the (tokens x vocabulary) float32 logits alone are 524 MB.
    The plain loss (logits, cross-entropy, backward) holds more than that at its peak; ours, the output layer and
    log-softmax in chunks recomputed in the backward, holds less than half of it (two chunk buffers of
    CHUNK_ELEMENTS float32 logits are 128 MB) — and computes the same loss."""
    B, T, V = 8, 512, 32000
    logits_bytes = B * T * V * 4
    assert 2 * CHUNK_ELEMENTS * 4 < logits_bytes // 2
    model = tiny_causal_lm(V, hidden_size=64, num_layers=2, num_heads=4, seed=0).to(device)
    batch = lm_batch(B, T, V, device)

    def peak(loss_fn) -> tuple[int, float]:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = loss_fn()
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, loss.item()

    def plain():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), batch["target_tokens"].reshape(-1))

    def ours():
        logprobs = forward_logprobs(model, batch).logprobs
        return -(logprobs * batch["weights"]).sum() / batch["weights"].sum()

    peak(ours)  # warm-up: the allocator's pools and cuBLAS's workspace, counted in neither measurement
    plain_bytes, plain_loss = peak(plain)
    ours_bytes, ours_loss = peak(ours)
    print(f"peak CUDA memory over the model, one forward+backward of {B}x{T} tokens at vocabulary {V}: plain loss "
          f"{plain_bytes / 2**20:.0f} MiB, ours {ours_bytes / 2**20:.0f} MiB ({ours_bytes / plain_bytes:.2f}x); "
          f"the float32 logits alone {logits_bytes / 2**20:.0f} MiB")
    assert plain_bytes > logits_bytes, (plain_bytes, logits_bytes)
    assert ours_bytes < logits_bytes // 2, (ours_bytes, logits_bytes)
    assert abs(ours_loss - plain_loss) <= 1e-4 * abs(plain_loss)


def test_sampling_from_a_checkpointed_generator_on_cuda():
    check_sampling_from_a_checkpointed_generator("cuda")


def test_rl_resumes_exactly_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    check_rl_resume(tmp_path, "cuda")


def test_the_chunked_output_layer_peaks_below_half_the_logits_on_cuda():
    check_chunked_output_layer_memory("cuda")


if __name__ == "__main__":  # the CPU run of the same checks, by hand
    import tempfile
    from pathlib import Path

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_sampling_from_a_checkpointed_generator(device)
    print("check_sampling_from_a_checkpointed_generator: holds")
    with tempfile.TemporaryDirectory() as folder:
        check_rl_resume(Path(folder), device)
    print("check_rl_resume: holds")
    if device == "cuda":
        check_chunked_output_layer_memory(device)
        print("check_chunked_output_layer_memory: holds")

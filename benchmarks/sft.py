"""SFT throughput: trained tokens per second of SFTTrainer vs a hand-written loop and TRL's SFTTrainer.

    python benchmarks/sft.py                                  # both sizes, every mode (about 20 minutes)
    python benchmarks/sft.py --sizes h128 --no-compile        # quick: eager modes only

Needs the `bench` extra (trl). Workload: 2,000 synthetic prompt/completion examples over a 1,000-word
vocabulary (prompts 4-36 words, completions 2-24; with BOS and EOS at most 62 tokens, so max_length 64 cuts
nothing), completion-only loss, batch 16, AdamW, tiny Llamas h128/4 layers and h256/6 layers (sdpa).

Modes, each its own model built from the same seed:
    hand eager / hand compiled  a plain loop over our padded batches (forward with use_cache=False, masked
                                cross-entropy over every position, backward, AdamW step), as a user writes it;
                                compiled with torch.compile(model, dynamic=True)
    hand eager, fused AdamW     the same with AdamW(fused=True), the optimizer paperloop (and transformers'
                                Trainer) uses: what is left between the two is the framework and its forward
    ours padded / packed        SFTTrainer's real loop (fit's train(), callbacks and all), padded batches of 16 or
                                packing=True (micro-batches of 16 x 64 positions in rows of 128)
    ours ... compiled           the same with compile=True (a second trainer of the same architecture reuses
                                the first one's compiled graph: compile time 0)
    TRL padded / padding-free / packed   trl.SFTTrainer with per_device_train_batch_size 16, max_length 64
                                (padding-free: one row of 16 examples with position_ids; packed: BFD rows of 64)

Method: one intra-op thread (on this shared 2-core machine two threads made TRL 18x slower). Every mode
advances in chunks of `--steps` steps, interleaved: a round runs one chunk of every mode (order rotated each
round). The first round is warm-up (and compilation) and is dropped; the rest give per-chunk rates, and the
table shows their median. TRL's loop runs in a thread that a callback pauses between chunks; ours runs in the
main thread by raising `max_steps` and calling `train()` again. Trained tokens are counted the same way for
every mode: target positions with a nonzero loss weight (completion tokens and EOS). TRL runs in float32
(`bf16=False`) like every other mode. The docs' Performance page (docs/performance.md) has the table measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from paperloop import SFTConfig, SFTTrainer
from paperloop.callbacks import Callback
from paperloop.models import tiny_causal_lm, word_level_tokenizer

SIZES = {"h128": dict(hidden_size=128, num_layers=4), "h256": dict(hidden_size=256, num_layers=6)}
WORDS = [f"w{i}" for i in range(1000)]
EXAMPLES, BATCH, MAX_LENGTH, LR = 2000, 16, 64, 1e-4


def make_examples(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"prompt": words(4, 36), "completion": " " + words(2, 24)} for _ in range(EXAMPLES)]


def build_model(tokenizer, size: str):
    return tiny_causal_lm(len(tokenizer), **SIZES[size], num_heads=4, seed=0)


class HandLoop:
    """A plain training loop over our padded batches, in our plan's order: nothing but the math."""

    def __init__(self, model, batches: list[dict], compiled: bool, fused: bool = False):
        # on the device the trainers chose for their batches (Accelerate's: a GPU where there is one)
        self.model, self.batches, self.i = model.to(batches[0]["input_ids"].device), batches, 0
        self.forward = torch.compile(model, dynamic=True) if compiled else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused or None)
        self.compile_seconds = None
        if compiled:
            start = time.perf_counter()
            self.run(1)
            self.compile_seconds = time.perf_counter() - start

    def run(self, steps: int) -> tuple[float, float]:
        tokens, start = 0.0, time.perf_counter()
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            logits_B_T_V = self.forward(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                        use_cache=False).logits
            nll_B_T = F.cross_entropy(logits_B_T_V.flatten(0, 1).float(), batch["target_tokens"].flatten(),
                                      reduction="none").view_as(batch["weights"])
            loss = (nll_B_T * batch["weights"]).sum() / batch["weights"].sum()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += float(batch["weights"].sum())
        synchronize()
        return time.perf_counter() - start, tokens


class CountTokens(Callback):
    def __init__(self):
        self.tokens = 0.0

    def on_batch_begin(self, trainer, step):
        self.tokens += step.weight


class Ours:
    """SFTTrainer's own loop, advanced `steps` at a time by raising max_steps and calling train() again."""

    def __init__(self, model, tokenizer, examples, out: str, packing: bool, compile: bool):
        self.counter = CountTokens()
        config = SFTConfig(max_length=MAX_LENGTH, packing=packing, batch_size=BATCH, lr=LR, max_steps=1,
                           log_every_steps=50, compile=compile, output_dir=out)
        self.trainer = SFTTrainer(model, config, tokenizer=tokenizer, train_data=examples, callbacks=[self.counter])
        self.trainer.fit()  # the first step (and compilation), so later chunks are steady state
        self.compile_seconds = self.trainer.compile_seconds if compile else None

    def run(self, steps: int) -> tuple[float, float]:
        t = self.trainer
        t.config = dataclasses.replace(t.config, max_steps=t.state.global_step + steps)
        tokens, start = self.counter.tokens, time.perf_counter()
        t.train()
        synchronize()
        return time.perf_counter() - start, self.counter.tokens - tokens

    def batches(self, count: int) -> list[dict]:
        """The padded batches this trainer's plan takes first (for the hand-written loop)."""
        plan, batches = self.trainer.make_plan(), []
        for step in plan.steps():
            batches.append(self.trainer.fetch(step.micro_batches[0]))
            plan.advance()
            if len(batches) == count:
                break
        return batches


class TRL:
    """trl.SFTTrainer.train() in a thread that a callback pauses after every chunk of steps."""

    def __init__(self, model, tokenizer, examples, out: str, mode: str):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer as TRLTrainer

        runner = self

        class Pause(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                runner.done += 1
                if runner.done >= runner.target:
                    runner.chunk_done.set()
                    runner.go.wait()
                    runner.go.clear()
                if runner.stop:
                    control.should_training_stop = True

        class Counting(TRLTrainer):
            def compute_loss(self, model, inputs, *args, **kwargs):
                runner.tokens += float((inputs["labels"][..., 1:] != -100).sum())  # trained target positions
                return super().compute_loss(model, inputs, *args, **kwargs)

        args = TRLConfig(output_dir=out, per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant",
                         weight_decay=0.0, max_steps=10**6, max_length=None if mode == "padding-free" else MAX_LENGTH,
                         padding_free=mode == "padding-free", packing=mode == "packed", report_to="none",
                         save_strategy="no", logging_steps=10**6, use_cpu=not torch.cuda.is_available(),
                         disable_tqdm=True, seed=0,
                         dataloader_num_workers=0, bf16=False, fp16=False)  # float32 like every other mode
        self.trainer = Counting(model=model, args=args, train_dataset=Dataset.from_list(examples),
                                processing_class=tokenizer, callbacks=[Pause()])
        self.go, self.chunk_done = threading.Event(), threading.Event()
        self.done, self.target, self.tokens, self.stop = 0, 1, 0.0, False
        self.thread = threading.Thread(target=self.trainer.train, daemon=True)
        self.thread.start()
        self.chunk_done.wait()  # the first step, outside every measurement
        self.compile_seconds = None

    def run(self, steps: int) -> tuple[float, float]:
        self.target, tokens = self.done + steps, self.tokens
        self.chunk_done.clear()
        start = time.perf_counter()
        self.go.set()
        self.chunk_done.wait()
        synchronize()
        return time.perf_counter() - start, self.tokens - tokens

    def close(self):
        self.stop = True
        self.go.set()
        self.thread.join()


def synchronize() -> None:
    """On a GPU, wait for the queued kernels before reading the clock (a no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_modes(size: str, compile: bool, trl: bool, out: str) -> dict:
    tokenizer = word_level_tokenizer(WORDS)
    examples = make_examples()
    modes = {}
    for name, packing in (("ours padded", False), ("ours packed", True)):
        modes[name] = Ours(build_model(tokenizer, size), tokenizer, examples, f"{out}/{name}", packing, False)
    batches = modes["ours padded"].batches(EXAMPLES // BATCH)
    modes["hand eager"] = HandLoop(build_model(tokenizer, size), batches, compiled=False)
    modes["hand eager, fused AdamW"] = HandLoop(build_model(tokenizer, size), batches, compiled=False, fused=True)
    if compile:
        modes["hand compiled"] = HandLoop(build_model(tokenizer, size), batches, compiled=True)
        for name, packing in (("ours padded compiled", False), ("ours packed compiled", True)):
            modes[name] = Ours(build_model(tokenizer, size), tokenizer, examples, f"{out}/{name}", packing, True)
    if trl:
        for mode in ("padded", "padding-free", "packed"):
            modes[f"TRL {mode}"] = TRL(build_model(tokenizer, size), tokenizer, examples, f"{out}/trl-{mode}", mode)
    return modes


def measure(modes: dict, rounds: int, steps: int) -> dict[str, dict]:
    rates = {name: [] for name in modes}
    names = list(modes)
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, tokens = modes[name].run(steps)
            if r > 0:  # round 0 is warm-up
                rates[name].append((tokens / seconds, seconds / steps, tokens / steps))
    return {name: {"tokens_per_s": statistics.median(x[0] for x in rs), "ms_per_step": 1e3 * statistics.median(x[1] for x in rs),
                   "tokens_per_step": statistics.mean(x[2] for x in rs), "compile_s": modes[name].compile_seconds}
            for name, rs in rates.items()}


def table(size: str, results: dict) -> str:
    trl = [r["tokens_per_s"] for n, r in results.items() if n.startswith("TRL")]
    hand = results["hand eager"]["tokens_per_s"]
    lines = [f"{size}: {'mode':24s} {'ms/step':>8s} {'tokens/step':>11s} {'tokens/s':>9s} {'vs hand eager':>13s} "
             f"{'vs TRL best':>11s} {'compile s':>9s}"]
    for name, r in results.items():
        vs_trl = f"{r['tokens_per_s'] / max(trl):.2f}x" if trl else "-"
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        lines.append(f"{'':5s} {name:24s} {r['ms_per_step']:8.1f} {r['tokens_per_step']:11.0f} {r['tokens_per_s']:9.0f} "
                     f"{r['tokens_per_s'] / hand:12.2f}x {vs_trl:>11s} {compile_s:>9s}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--rounds", type=int, default=7, help="measured rounds (after one warm-up round)")
    p.add_argument("--steps", type=int, default=15, help="steps per mode per round")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--out", default="/tmp/paperloop-bench-sft")
    args = p.parse_args()
    torch.set_num_threads(1)
    for size in args.sizes:
        modes = build_modes(size, not args.no_compile, not args.no_trl, f"{args.out}/{size}")
        results = measure(modes, args.rounds, args.steps)
        for mode in modes.values():
            if isinstance(mode, TRL):
                mode.close()
        print(table(size, results), flush=True)


if __name__ == "__main__":
    main()

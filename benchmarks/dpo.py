"""DPO throughput and peak memory: a hand-written loop (full logits), TRL's DPOTrainer and ours, at vocabulary 32k.

    python benchmarks/dpo.py                                  # every contender, 5 rounds (45 min on a busy 2-core box)
    python benchmarks/dpo.py --rounds 2 --steps 3             # quick
    python benchmarks/dpo.py --contenders hand ours           # without TRL (no `bench` extra needed)

Needs the `bench` extra (trl) for the TRL rows. Workload: a tiny Llama at a real vocabulary (32,000 words; hidden 64,
2 layers, 4 heads: the output layer holds 2.0M of the 2.2M weights outside the input embedding, so the logits
dominate, as they do for a real model's long completions), 512 synthetic pairs, prompts of 16-64 words and chosen /
rejected completions of 16-128 words each (with BOS and EOS at most 194 tokens a side: max_length 256 cuts
nothing), 8 pairs a step, the sigmoid (DPO) loss at beta 0.1 against the frozen initial model, AdamW lr 1e-5.

Contenders, each its own model built from the same seed, each in its own process (peak RSS is a process's
high-water mark, so the peaks do not mix):
    hand                  the loop a user writes in plain torch: our padded pair batches (chosen and rejected rows
                          in one forward), the policy's and the reference's full (rows x positions x vocabulary)
                          logits, log_softmax, gather, sums over the completion tokens, the loss, backward, and
                          AdamW(fused=True) — the optimizer paperloop and transformers' Trainer use
    ours                  DPOTrainer's real loop (fit's train(), callbacks and all)
    ours, precomputed ref DPOTrainer with precompute_ref_logprobs=True (the reference scores every pair once, before
                          the first step, which the timing leaves out)
    TRL                   trl.DPOTrainer, like with like: float32 (bf16=False), no gradient checkpointing, the fused
                          AdamW, the reference a frozen copy scored every step, padded rows. Padding-free is off on
                          both sides: TRL 1.16's `padding_free=True` warns and falls back to padding ("temporarily
                          unavailable"), and ours pads each micro-batch's rows to its longest
    TRL defaults          trl.DPOConfig's own defaults but the batch, lr and lengths (an extra row: not like with like)

Method: one intra-op thread per process. Every contender is built, takes one step, and waits; then rounds
interleave them (order rotated each round), each advancing `--steps` steps while the others wait. The first round is
warm-up and dropped; the table shows the median pairs/s of the rest, and each process's peak RSS at the end (the
whole process: Python, torch, the model, the reference, the data), with the RSS it held once the model and the pairs
were built, before the trainer ("model and data built"). TRL's loop runs in a thread that a callback pauses between
chunks; ours by raising `max_steps` and calling `train()` again. The README's preference section has the table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

VOCAB, HIDDEN, LAYERS, HEADS = 32000, 64, 2, 4
PAIRS, STEP_PAIRS, MAX_LENGTH, BETA, LR = 512, 8, 256, 0.1, 1e-5
CONTENDERS = ("hand", "ours", "ours, precomputed ref", "TRL", "TRL defaults")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build():
    """The tokenizer, the pairs and the model: the same for every contender."""
    from paperloop.models import tiny_causal_lm, word_level_tokenizer

    words = [f"w{i}" for i in range(VOCAB - 8)]  # + 8 special and spare ids
    tokenizer = word_level_tokenizer(words)
    rng = random.Random(0)
    text = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    pairs = [{"prompt": text(16, 64), "chosen": " " + text(16, 128), "rejected": " " + text(16, 128)}
             for _ in range(PAIRS)]
    model = tiny_causal_lm(len(tokenizer), HIDDEN, LAYERS, HEADS, seed=0, max_position_embeddings=MAX_LENGTH)
    return tokenizer, pairs, model


class Hand:
    """DPO in plain torch over our padded pair batches: full logits for the policy and the reference."""

    def __init__(self, model, tokenizer, pairs, out: str):
        from paperloop.preference import pair_batch, tokenize_pairs

        kept, _ = tokenize_pairs(pairs, tokenizer, MAX_LENGTH)
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0)).tolist()
        self.batches = [pair_batch([kept[i] for i in order[s:s + STEP_PAIRS]], tokenizer.pad_token_id)
                        for s in range(0, len(order), STEP_PAIRS)]
        self.model, self.reference = model.train(), copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
        self.i = 0
        self.run(1)

    @staticmethod
    def logps(model, batch) -> torch.Tensor:
        """(2P,) each row's summed log-probs of its completion tokens, from the full (2P, T, V) logits."""
        logits_B_T_V = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logps_B_T = logits_B_T_V.log_softmax(-1).gather(2, batch["target_tokens"][..., None]).squeeze(-1)
        return (logps_B_T * batch["weights"]).sum(1)

    def run(self, steps: int) -> tuple[float, float]:
        start = time.perf_counter()
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            with torch.no_grad():
                ref_chosen, ref_rejected = self.logps(self.reference, batch).chunk(2)
            chosen, rejected = self.logps(self.model, batch).chunk(2)
            loss = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, steps * STEP_PAIRS


class Ours:
    """DPOTrainer's own loop, advanced `steps` at a time by raising max_steps and calling train() again."""

    def __init__(self, model, tokenizer, pairs, out: str, precompute: bool = False):
        from paperloop.callbacks import Callback
        from paperloop.preference import DPOConfig, DPOTrainer

        class Count(Callback):
            pairs = 0.0

            def on_batch_begin(self, trainer, step):
                self.pairs += step.weight  # every pair weighs 1

        self.count = Count()
        config = DPOConfig(beta=BETA, batch_size=STEP_PAIRS, lr=LR, max_length=MAX_LENGTH, max_steps=1,
                           log_every_steps=10**6, precompute_ref_logprobs=precompute, output_dir=out)
        self.trainer = DPOTrainer(model, config, tokenizer=tokenizer, train_data=pairs, callbacks=[self.count])
        self.trainer.fit()  # the first step (and the precomputed reference), outside every measurement

    def run(self, steps: int) -> tuple[float, float]:
        t = self.trainer
        t.config = dataclasses.replace(t.config, max_steps=t.state.global_step + steps)
        pairs, start = self.count.pairs, time.perf_counter()
        t.train()
        return time.perf_counter() - start, self.count.pairs - pairs


class TRL:
    """trl.DPOTrainer.train() in a thread that a callback pauses after every chunk of steps."""

    def __init__(self, model, tokenizer, pairs, out: str, mode: str):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig as TRLConfig
        from trl import DPOTrainer as TRLTrainer

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

        like_with_like = dict(bf16=False, fp16=False, gradient_checkpointing=False, optim="adamw_torch_fused")
        args = TRLConfig(output_dir=out, per_device_train_batch_size=STEP_PAIRS, learning_rate=LR, beta=BETA,
                         lr_scheduler_type="constant", weight_decay=0.0, max_steps=10**6, max_length=MAX_LENGTH,
                         report_to="none", save_strategy="no", logging_steps=10**6, use_cpu=True, disable_tqdm=True,
                         seed=0, dataloader_num_workers=0, **(like_with_like if mode != "defaults" else {}))
        # The reference: a frozen copy of the initial model, as the others take it (TRL would load one from the
        # model's hub path, which a model built from a config has not)
        self.trainer = TRLTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                  train_dataset=Dataset.from_list(pairs),
                                  processing_class=tokenizer, callbacks=[Pause()])
        self.go, self.chunk_done = threading.Event(), threading.Event()
        self.done, self.target, self.stop = 0, 1, False
        self.thread = threading.Thread(target=self.trainer.train, daemon=True)
        self.thread.start()
        self.chunk_done.wait()  # the first step, outside every measurement

    def run(self, steps: int) -> tuple[float, float]:
        self.target = self.done + steps
        self.chunk_done.clear()
        start = time.perf_counter()
        self.go.set()
        self.chunk_done.wait()
        return time.perf_counter() - start, steps * STEP_PAIRS

    def close(self):
        self.stop = True
        self.go.set()
        self.thread.join()


def child(contender: str) -> None:
    """One contender in this process: build, one step, then `run N` commands from stdin until `stop`."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else this process prints goes to stderr
    torch.set_num_threads(1)
    tokenizer, pairs, model = build()
    baseline = rss_mb()
    with tempfile.TemporaryDirectory() as out:
        if contender == "hand":
            runner = Hand(model, tokenizer, pairs, out)
        elif contender.startswith("ours"):
            runner = Ours(model, tokenizer, pairs, out, precompute="precomputed" in contender)
        else:
            runner = TRL(model, tokenizer, pairs, out, "defaults" if contender == "TRL defaults" else "padded")
        protocol.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            if line.startswith("run"):
                seconds, done = runner.run(int(line.split()[1]))
                protocol.write(json.dumps({"seconds": seconds, "pairs": done}) + "\n")
            else:
                break
        if isinstance(runner, TRL):
            runner.close()
    protocol.write(json.dumps({"peak_mb": peak_rss_mb(), "baseline_mb": baseline}) + "\n")


class Process:
    """A contender's process, driven line by line."""

    def __init__(self, contender: str):
        self.name = contender
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", contender], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        reply = self.proc.stdout.readline()
        if not reply:
            sys.exit(f"{self.name}: its process ended early (exit {self.proc.wait()}); run it alone with "
                     f"--child '{self.name}' to see why")
        return json.loads(reply)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up round)")
    parser.add_argument("--steps", type=int, default=5, help="steps per contender per round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    names = args.contenders
    procs = {}
    for name in names:  # built one at a time: building is not measured, but must not overlap a measured chunk
        procs[name] = Process(name)
        procs[name].read()
        print(f"{name}: ready", file=sys.stderr, flush=True)
    rates = {name: [] for name in names}
    for r in range(args.rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            reply = procs[name].ask(f"run {args.steps}")
            if r > 0:  # round 0 is warm-up
                rates[name].append(reply["pairs"] / reply["seconds"])
        print(f"round {r}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names if rates[n]), file=sys.stderr,
              flush=True)
    memory = {name: procs[name].ask("stop") for name in names}
    for p in procs.values():
        p.proc.wait()
    median = {name: statistics.median(rates[name]) for name in names}
    hand = median.get("hand")
    trl = median.get("TRL")
    print(f"\n{STEP_PAIRS} pairs a step, vocabulary {VOCAB:,}, hidden {HIDDEN}, {LAYERS} layers, float32, 1 thread each; "
          f"medians of {args.rounds} rounds of {args.steps} steps\n")
    print("| contender | pairs/s | vs hand | vs TRL | peak RSS MB | model and data built MB | peak vs hand |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        m = memory[name]
        vs_hand = f"{median[name] / hand:.2f}x" if hand else "-"
        vs_trl = f"{median[name] / trl:.2f}x" if trl else "-"
        peak_vs = f"{m['peak_mb'] / memory['hand']['peak_mb']:.2f}x" if hand else "-"
        bold = "**" if name.startswith("ours") else ""
        print(f"| {bold}{name}{bold} | {median[name]:.2f} | {vs_hand} | {vs_trl} | {m['peak_mb']:,.0f} | "
              f"{m['baseline_mb']:,.0f} | {peak_vs} |")


if __name__ == "__main__":
    main()

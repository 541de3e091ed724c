"""Peak memory and throughput of SFT at real vocabularies: a plain transformers loop, TRL's SFTTrainer and ours.

    python benchmarks/memory.py                          # vocabularies 32,000 and 151,936, 3 rounds (~20 minutes)
    python benchmarks/memory.py --vocabs 32000 --rounds 1

Needs the `bench` extra (trl). Workload: a 2-layer Llama (hidden 64, 4 heads), 8 rows of 512 tokens of text per
step (every position trained), AdamW, float32, one intra-op thread. Each measurement is its own process (peak RSS
is a process's high-water mark), built, warmed up by one step, then timed over `--steps` steps; rounds interleave
the modes (order rotated) and the table shows medians. Modes, each with and without gradient checkpointing:
    plain   the loop a user writes: forward to (B, T, V) logits, F.cross_entropy over them, backward, AdamW step
    TRL     trl.SFTTrainer (per_device_train_batch_size 8, max_length 512, bf16=False), `gradient_checkpointing`
    ours    SFTTrainer's own loop (`gradient_checkpointing`): the output layer and log-softmax in chunks
Peak RSS is the whole process (Python, torch, the model, the data); "over baseline" subtracts what the process
held after building everything and before its first step. Achieved FLOP/s counts 6 x parameters (all but the
input embedding, a lookup) x trained tokens per second, against a 2048 x 2048 float32 matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROWS, LENGTH, LR = 8, 512, 1e-4
MODES = ("plain", "plain, checkpointing", "TRL", "TRL, checkpointing", "ours", "ours, checkpointing")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(vocab: int):
    from paperloop.models import tiny_causal_lm, word_level_tokenizer

    tokenizer = word_level_tokenizer([f"w{i}" for i in range(vocab - 8)])  # 8 special and spare ids
    g = torch.Generator().manual_seed(0)
    words = torch.randint(8, len(tokenizer), (4 * ROWS, LENGTH - 2), generator=g)  # + BOS and EOS: 512 tokens
    examples = [{"text": " ".join(tokenizer.convert_ids_to_tokens(row.tolist()))} for row in words]
    model = tiny_causal_lm(len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, seed=0,
                           max_position_embeddings=LENGTH)
    return tokenizer, examples, model


def plain(model, tokenizer, examples, checkpointing: bool, steps: int) -> tuple[float, float]:
    from paperloop.lm.data import pad_batch, tokenize_examples

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept, _ = tokenize_examples(examples, tokenizer, max_length=LENGTH)
    batches = [pad_batch(kept[i:i + ROWS], tokenizer.pad_token_id) for i in range(0, len(kept), ROWS)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def step(batch):
        logits_B_T_V = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        nll_B_T = F.cross_entropy(logits_B_T_V.flatten(0, 1).float(), batch["target_tokens"].flatten(),
                                  reduction="none").view_as(batch["weights"])
        ((nll_B_T * batch["weights"]).sum() / batch["weights"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(batch["weights"].sum())

    step(batches[0])
    start, tokens = time.perf_counter(), 0.0
    for i in range(steps):
        tokens += step(batches[(i + 1) % len(batches)])
    return time.perf_counter() - start, tokens


def ours(model, tokenizer, examples, checkpointing: bool, steps: int) -> tuple[float, float]:
    from paperloop import SFTConfig, SFTTrainer
    from paperloop.callbacks import Callback

    class Count(Callback):
        tokens, start = 0.0, None

        def on_batch_begin(self, trainer, step):
            if trainer.state.global_step == 1:  # after the warm-up step
                self.start = time.perf_counter()
            if self.start is not None:
                self.tokens += step.weight

    count = Count()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(max_length=LENGTH, batch_size=ROWS, lr=LR, max_steps=1 + steps, log_every_steps=10**6,
                           gradient_checkpointing=checkpointing, output_dir=out)
        SFTTrainer(model, config, tokenizer=tokenizer, train_data=examples, callbacks=[count]).fit()
    return time.perf_counter() - count.start, count.tokens


def trl(model, tokenizer, examples, checkpointing: bool, steps: int) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(output_dir=out, per_device_train_batch_size=ROWS, learning_rate=LR, max_steps=1 + steps,
                         max_length=LENGTH, gradient_checkpointing=checkpointing, report_to="none",
                         save_strategy="no", logging_steps=10**6, use_cpu=True, disable_tqdm=True, seed=0,
                         dataloader_num_workers=0, bf16=False, fp16=False, lr_scheduler_type="constant")
        TRLTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                   callbacks=[Clock()]).train()
    return marks[-1] - marks[0], steps * ROWS * (LENGTH - 1)  # every target position is trained


def child(mode: str, vocab: int, steps: int) -> dict:
    torch.set_num_threads(1)
    tokenizer, examples, model = build(vocab)
    baseline = rss_mb()
    kind, checkpointing = mode.split(",")[0], "checkpointing" in mode
    seconds, tokens = {"plain": plain, "ours": ours, "TRL": trl}[kind](model, tokenizer, examples, checkpointing, steps)
    parameters = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return dict(peak_mb=peak_rss_mb(), baseline_mb=baseline, tokens_per_s=tokens / seconds, parameters=parameters)


def matmul_flops(repeats: int = 5) -> float:
    torch.set_num_threads(1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.vocab, args.steps)))
        return
    results = {(v, m): [] for v in args.vocabs for m in args.modes}
    flops = []
    for r in range(args.rounds):
        order = args.modes[r % len(args.modes):] + args.modes[:r % len(args.modes)]
        for vocab, mode in itertools.product(args.vocabs, order):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--vocab", str(vocab), "--steps",
                                  str(args.steps)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} at vocabulary {vocab} failed:\n{out.stderr[-3000:]}")
            results[vocab, mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {mode}, vocabulary {vocab}: {results[vocab, mode][-1]}", file=sys.stderr)
        flops.append(matmul_flops())
    peak_flops = statistics.median(flops)
    print(f"\n{ROWS} rows x {LENGTH} tokens, 2-layer h64 Llama, float32, 1 thread; medians of {args.rounds} rounds; "
          f"a 2048^3 matmul: {peak_flops / 1e9:.1f} GFLOP/s\n")
    print("| vocabulary | mode | peak RSS MB | over baseline MB | peak vs plain | tokens/s | tokens/s vs plain "
          "| achieved GFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    for vocab in args.vocabs:
        med = {m: {k: statistics.median(run[k] for run in results[vocab, m]) for k in results[vocab, m][0]}
               for m in args.modes}
        base = med.get("plain")
        for mode in args.modes:
            x = med[mode]
            achieved = 6 * x["parameters"] * x["tokens_per_s"]
            vs = (f"{x['peak_mb'] / base['peak_mb']:.2f}x", f"{x['tokens_per_s'] / base['tokens_per_s']:.2f}x") \
                if base else ("", "")
            bold = "**" if mode.startswith("ours") else ""
            print(f"| {vocab:,} | {bold}{mode}{bold} | {x['peak_mb']:,.0f} | {x['peak_mb'] - x['baseline_mb']:,.0f} | "
                  f"{vs[0]} | {x['tokens_per_s']:,.0f} | {vs[1]} | {achieved / 1e9:.2f} | "
                  f"{achieved / peak_flops:.0%} |")


if __name__ == "__main__":
    main()

"""Distillation's cost: on-policy distillation against GRPO on the same batch, and off-policy KD at vocabulary 32k
against a hand-written loop that makes both models' full logits.

    python benchmarks/distill.py                          # both parts, 3 rounds (about 10 minutes here)
    python benchmarks/distill.py --parts offpolicy --rounds 1

On-policy (`RLTrainer`): 8 prompts x 4 completions of 16 new tokens, a tiny Llama (hidden 128, 4 layers, vocabulary
101; `benchmarks/grpo.py`'s, EOS never sampled so every contender decodes the full budget), one update a step,
AdamW, float32. Contenders: GRPO (beta 0); GRPO with RL's reference pass (beta 0.04: one no-grad forward of a frozen
copy of the same model); on-policy distillation (GRPO's reward plus `teacher=`, a model of the same size: one no-grad
forward of it). The teacher's and the reference's forwards are timed inside the step (the thread's CPU seconds
around `teacher_logprobs` / `reference_logprobs`); the goal is a teacher forward that costs no more than the
reference's. Student tokens/s: completion tokens trained per wall second of the whole step (sampling included).

Off-policy (`SFTTrainer(teacher=...)`): 8 rows x 256 tokens of text a step (every position trained), student a
2-layer Llama (hidden 64), teacher a 2-layer Llama (hidden 128), vocabulary 32,000, AdamW, float32. Contenders:
    hand KD        what a user writes: both models' (B, T, V) logits, log-softmax of each, the forward KL
                   Σ q (log q - log p) per position (F.kl_div, log_target) averaged, backward, AdamW
    ours SFT       SFTTrainer without a teacher (the NLL alone): what the teacher adds to a step is the difference
    ours forward_kl / top_k   SFTTrainer(teacher=...) with distill="forward_kl" / "top_k" (k = 20)
Peak RSS is a process's high-water mark, so every run (both parts) is a child process of its own; rounds interleave
the contenders (order rotated) and the table shows medians over rounds of each run's median step. One intra-op
thread everywhere. "over baseline": peak minus what the process held once everything was built.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo import make_prompts, make_tokenizer, never_eos, reward_count, save_model  # noqa: E402

ON_POLICY = ("GRPO", "GRPO + reference (beta 0.04)", "on-policy distillation")
OFF_POLICY = ("hand KD", "ours SFT (no teacher)", "ours forward_kl", "ours top_k")
ROWS, LENGTH, VOCAB_KD, LR = 8, 256, 32000, 1e-4


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_timed(record: list, fn):
    """`fn`, adding each call's thread CPU seconds to the open entry of `record`."""
    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            record[-1] += time.thread_time() - start
    return timed


# ---- on-policy: one child process per run ----------------------------------------------------------------------


def on_policy(mode: str, args) -> dict:
    from transformers import LlamaForCausalLM

    from paperloop import RLConfig, RLTrainer
    from paperloop.callbacks import LambdaCallback

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model")
        student = never_eos(LlamaForCausalLM.from_pretrained(model_dir))
        teacher = None
        if mode == "on-policy distillation":  # the same architecture, other weights
            teacher = never_eos(LlamaForCausalLM.from_pretrained(model_dir))
            with torch.no_grad():
                for p in teacher.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
        prompts = make_prompts(args.prompts * (args.warmup + args.steps))
        config = RLConfig(batch_size=args.prompts, num_generations=args.generations, max_new_tokens=args.new_tokens,
                          beta=0.04 if "reference" in mode else 0.0, lr=1e-6, max_grad_norm=1.0, log_completions=0,
                          max_steps=args.warmup + args.steps, output_dir=str(Path(tmp) / "run"), seed=0)
        wall, cpu, extra, tokens = [], [], [], []

        def begin(trainer, step):
            wall.append(-time.perf_counter())
            cpu.append(-time.thread_time())
            extra.append(0.0)

        def end(trainer, outputs):
            wall.append(wall.pop() + time.perf_counter())
            cpu.append(cpu.pop() + time.thread_time())
            tokens.append(float(outputs["rollout/completion_len"]) * args.prompts * args.generations)

        trainer = RLTrainer(student, config, tokenizer=make_tokenizer(), train_data=[{"prompt": p} for p in prompts],
                            reward_fns=[lambda prompt, completion, example: reward_count(completion)],
                            teacher=teacher, callbacks=[LambdaCallback(on_batch_begin=begin, on_batch_end=end)])
        trainer.teacher_logprobs = cpu_timed(extra, trainer.teacher_logprobs)
        trainer.reference_logprobs = cpu_timed(extra, trainer.reference_logprobs)
        baseline = rss_mb()
        trainer.fit()
    skip = slice(args.warmup, None)
    return dict(step_s=statistics.median(wall[skip]), step_cpu_s=statistics.median(cpu[skip]),
                extra_cpu_s=statistics.median(extra[skip]), tokens=statistics.median(tokens[skip]),
                peak_mb=peak_rss_mb(), baseline_mb=baseline)


# ---- off-policy: one child process per run ---------------------------------------------------------------------


def kd_setup():
    from paperloop.lm.data import pad_batch, tokenize_examples
    from paperloop.models import tiny_causal_lm, word_level_tokenizer

    tokenizer = word_level_tokenizer([f"w{i}" for i in range(VOCAB_KD - 8)])  # 8 special and spare ids
    g = torch.Generator().manual_seed(0)
    words = torch.randint(8, len(tokenizer), (4 * ROWS, LENGTH - 2), generator=g)  # + BOS and EOS
    examples = [{"text": " ".join(tokenizer.convert_ids_to_tokens(row.tolist()))} for row in words]
    student = tiny_causal_lm(len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, seed=0,
                             max_position_embeddings=LENGTH)
    teacher = tiny_causal_lm(len(tokenizer), hidden_size=128, num_layers=2, num_heads=4, seed=1,
                             max_position_embeddings=LENGTH)
    kept, _ = tokenize_examples(examples, tokenizer, max_length=LENGTH)
    batches = [pad_batch(kept[i:i + ROWS], tokenizer.pad_token_id) for i in range(0, len(kept), ROWS)]
    return tokenizer, examples, batches, student, teacher


def hand_kd(student, teacher, batches, steps: int) -> tuple[list[float], list[float], list[float]]:
    """Both models' full logits, the forward KL per trained position, its mean, backward, AdamW."""
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, fused=True)
    wall, cpu, tokens = [], [], []
    for i in range(1 + steps):
        batch = batches[i % len(batches)]
        start, start_cpu = time.perf_counter(), time.thread_time()
        kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        with torch.no_grad():
            teacher_logp_B_T_V = torch.log_softmax(teacher(**kwargs).logits.float(), -1)
        logp_B_T_V = torch.log_softmax(student(**kwargs).logits.float(), -1)
        kl_B_T = F.kl_div(logp_B_T_V, teacher_logp_B_T_V, reduction="none", log_target=True).sum(-1)
        weights_B_T = batch["weights"]
        ((kl_B_T * weights_B_T).sum() / weights_B_T.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
        tokens.append(float(weights_B_T.sum()))
    return wall[1:], cpu[1:], tokens[1:]


def ours_kd(student, teacher, tokenizer, examples, steps: int, distill: str | None):
    from paperloop import SFTConfig, SFTTrainer
    from paperloop.callbacks import LambdaCallback

    wall, cpu, tokens = [], [], []

    def begin(trainer, step):
        wall.append(-time.perf_counter())
        cpu.append(-time.thread_time())
        tokens.append(step.weight)

    def end(trainer, outputs):
        wall.append(wall.pop() + time.perf_counter())
        cpu.append(cpu.pop() + time.thread_time())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(max_length=LENGTH, batch_size=ROWS, lr=LR, max_steps=1 + steps, log_every_steps=10**6,
                           output_dir=out, **({"distill": distill} if distill else {}))
        SFTTrainer(student, config, tokenizer=tokenizer, train_data=examples, teacher=teacher if distill else None,
                   callbacks=[LambdaCallback(on_batch_begin=begin, on_batch_end=end)]).fit()
    return wall[1:], cpu[1:], tokens[1:]


def off_policy(mode: str, args) -> dict:
    tokenizer, examples, batches, student, teacher = kd_setup()
    baseline = rss_mb()
    if mode == "hand KD":
        wall, cpu, tokens = hand_kd(student, teacher, batches, args.kd_steps)
    else:
        distill = None if "no teacher" in mode else mode.removeprefix("ours ")
        wall, cpu, tokens = ours_kd(student, teacher, tokenizer, examples, args.kd_steps, distill)
    return dict(step_s=statistics.median(wall), step_cpu_s=statistics.median(cpu), tokens=statistics.median(tokens),
                peak_mb=peak_rss_mb(), baseline_mb=baseline)


# ---- the parent: interleaved rounds of child processes, then the tables -----------------------------------------


def child(mode: str, args) -> dict:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return on_policy(mode, args) if mode in ON_POLICY else off_policy(mode, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["onpolicy", "offpolicy"], default=["onpolicy", "offpolicy"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed on-policy steps a run")
    parser.add_argument("--kd-steps", type=int, default=3, help="timed off-policy steps a run (after one warm-up)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    modes = (ON_POLICY if "onpolicy" in args.parts else ()) + (OFF_POLICY if "offpolicy" in args.parts else ())
    results = {mode: [] for mode in modes}
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("parts", "child", "rounds")]
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            out = subprocess.run([sys.executable, __file__, "--child", mode, *passed], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {mode}: {results[mode][-1]}", file=sys.stderr, flush=True)
    med = {m: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for m, runs in results.items()}
    if "onpolicy" in args.parts:
        print_on_policy(med, results, args)
    if "offpolicy" in args.parts:
        print_off_policy(med, args)


def print_on_policy(med, results, args) -> None:
    print(f"\nOn-policy: {args.prompts} prompts x {args.generations} completions, {args.new_tokens} new tokens, h128 "
          f"4-layer Llama, vocabulary 101, 1 thread; medians of {args.rounds} rounds x {args.steps} steps\n")
    print("| contender | student tokens/s | tokens/CPU-s | s/step | CPU s/step | vs GRPO (CPU) | extra forward CPU "
          "s/step | peak RSS MB | over baseline MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    grpo = med["GRPO"]["step_cpu_s"]
    for mode in ON_POLICY:
        x = med[mode]
        extra = f"{x['extra_cpu_s']:.4f}" if mode != "GRPO" else "-"
        print(f"| {mode} | {x['tokens'] / x['step_s']:,.0f} | {x['tokens'] / x['step_cpu_s']:,.0f} | "
              f"{x['step_s']:.3f} | {x['step_cpu_s']:.3f} | {x['step_cpu_s'] / grpo:.2f}x | {extra} | "
              f"{x['peak_mb']:,.0f} | {x['peak_mb'] - x['baseline_mb']:,.0f} |")
    teacher, reference = (med[m]["extra_cpu_s"] for m in ON_POLICY[2:0:-1])
    rounds = [t["extra_cpu_s"] / r["extra_cpu_s"] for t, r in zip(results[ON_POLICY[2]], results[ON_POLICY[1]])]
    print(f"\nThe teacher's forward: {teacher:.4f} CPU s a step, {teacher / reference:.2f}x the reference's "
          f"({reference:.4f}; goal <= 1x); round by round {', '.join(f'{r:.2f}x' for r in rounds)}.")


def print_off_policy(med, args) -> None:
    print(f"\nOff-policy KD: {ROWS} rows x {LENGTH} tokens, vocabulary {VOCAB_KD:,}, student 2-layer h64, teacher "
          f"2-layer h128, float32, 1 thread; medians of {args.rounds} rounds x {args.kd_steps} steps\n")
    print("| contender | student tokens/s | s/step | CPU s/step | tokens/CPU-s vs hand KD | peak RSS MB | "
          "over baseline MB | peak vs hand KD | over baseline vs hand KD |")
    print("|---|---|---|---|---|---|---|---|---|")
    hand = med["hand KD"]
    for mode in OFF_POLICY:
        x = med[mode]
        bold = "**" if mode.startswith("ours") and mode != "ours SFT (no teacher)" else ""
        print(f"| {bold}{mode}{bold} | {x['tokens'] / x['step_s']:,.0f} | {x['step_s']:.3f} | {x['step_cpu_s']:.3f} | "
              f"{hand['step_cpu_s'] / x['step_cpu_s']:.2f}x | {x['peak_mb']:,.0f} | "
              f"{x['peak_mb'] - x['baseline_mb']:,.0f} | {x['peak_mb'] / hand['peak_mb']:.2f}x | "
              f"{(x['peak_mb'] - x['baseline_mb']) / (hand['peak_mb'] - hand['baseline_mb']):.2f}x |")


if __name__ == "__main__":
    main()

"""GRPO steps per second: paperloop's RLTrainer, TRL's GRPOTrainer (the `bench` extra) and a hand-written loop; with
`--async`, the synchronous loop against asynchronous generation.

    python benchmarks/grpo.py                      # 8 prompts x 4 completions, 16 new tokens, beta 0 and 0.04
    python benchmarks/grpo.py --repeats 7 --steps 10
    python benchmarks/grpo.py --async --betas 0    # sync (2 threads) vs async_generation, max_lag 1 and 2

A fourth row runs RLTrainer with DAPO's dynamic sampling on a reward where about half the groups tie: the extra
prompts it draws are its cost. A fifth runs TRL with its own defaults (bf16 autocast and gradient checkpointing,
which GRPOConfig turns on), labelled as such: on a CPU without native bf16 that is what a TRL user gets, but not
the same work as the other rows.

One intra-op thread, one process, a tiny Llama (hidden 128, 4 layers, MLP 256, vocab 101) saved to a temporary
folder that all load. Its output layer gives EOS (id 100) a logit of -1e9 in every contender (`never_eos`: a
frozen bias on the output layer; TRL rebuilds its reference from the folder, without it: another KL value, the
same cost), so no completion stops early: all decode the full budget (equal work).
Equal settings: group-std advantages with the per-sequence mean (TRL `loss_type="grpo"`), one update per rollout
batch, fused AdamW (PyTorch's one-kernel update; no weight decay) at lr 1e-6, gradient clipping at 1.0,
temperature 1, no top-k/top-p, float32 without autocast, no gradient checkpointing, no completion logging.

The hand-written loop is what a researcher writes without a framework (`run_hand`): `model.generate`, the GRPO
update in plain torch, clip, AdamW; no checkpointable sampler, no metrics, no callbacks.

Each round builds a fresh trainer of each kind for each beta, in turn (interleaved, so machine noise hits all
alike), runs `--warmup` steps, then times `--steps` steps: each step between the loop's hooks (wall seconds and the
thread's CPU seconds, robust to other processes on a shared machine), and generation as the step reports it
(`time/generate_s`, ours) or around `model.generate` (TRL, hand). The table gives medians over rounds of each
round's median. `--only ours hand` runs a subset (e.g. to compare two versions of paperloop against the same hand
loop, as `benchmarks/ab.py` does).

`--async` measures what `RLConfig(async_generation=True, max_lag=k)` buys on a machine with two cores: the
synchronous RLTrainer on two intra-op threads (sampling and training each use both) against async generation
with k = 1 and 2, where a process of its own samples on one thread while the trainer trains on the other.
Completions per wall second, a step timed from the end of the one before (the loop's whole time: with async
generation, whatever the trainer waits for); each round's ratio to that round's synchronous run, the median and
range of those ratios. An extra row runs the synchronous loop on one thread (what each side of the asynchronous one
gets): on a machine whose cores other jobs share, two threads that wait for each other at every op can cost more
than they give.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from paperloop import RLConfig, RLTrainer
from paperloop.callbacks import LambdaCallback

VOCAB = 101
EOS = VOCAB - 1  # never sampled: see never_eos


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = {"<pad>": 0, "<bos>": 1, **{f"w{i}": i for i in range(2, EOS)}, "<eos>": EOS}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<pad>")


def save_model(folder: Path) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def never_eos(model):
    """`model` with EOS's logit at -1e9 (its probability exactly 0 in float32): every completion runs the full
    budget, in each contender alike. The output layer becomes an `nn.Linear` with a frozen bias, 0 but -1e9 at EOS
    (the same weights): a part of the model, not a hook, so a generation process's copy of it has it too."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[EOS] = -1e9
    biased.bias.requires_grad_(False)
    model.set_output_embeddings(biased)
    return model


def make_prompts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 25, (n,), generator=g).tolist()
    return [" ".join(f"w{t}" for t in torch.randint(2, VOCAB, (length - 1,), generator=g).tolist())
            for length in lengths]


def reward_count(text: str) -> float:
    return float(text.split().count("w7") + text.split().count("w42"))  # any cheap score that varies in a group


def reward_has_w7(text: str) -> float:
    """1 when w7 is among the 16 words (~15% of completions): about half the groups of 4 tie, all 0."""
    return float("w7" in text.split())


def score_count(prompt: str, completion: str, example: dict) -> float:
    """RLTrainer's reward function (module-level: a generation process of its own gets it by pickling)."""
    return reward_count(completion)


def score_has_w7(prompt: str, completion: str, example: dict) -> float:
    return reward_has_w7(completion)


def fresh_accelerate_state() -> None:
    """transformers' Trainer leaves Accelerate's process-wide state set with its own precision flag, which a later
    Accelerator refuses to change; each contender starts from a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class Clock:
    """Wall and thread CPU seconds of each interval. On a shared machine the wall time includes waiting for a
    core; with one intra-op thread, all compute runs on the calling thread, so its CPU time is the work alone."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def start(self) -> None:
        self.wall.append(-time.perf_counter())
        self.cpu.append(-time.thread_time())

    def stop(self) -> None:
        if torch.cuda.is_available():  # on a GPU, the queued kernels are part of the interval
            torch.cuda.synchronize()
        self.wall.append(self.wall.pop() + time.perf_counter())
        self.cpu.append(self.cpu.pop() + time.thread_time())

    def timing(self, fn):
        def timed(*args, **kwargs):
            self.start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop()
        return timed


def run_ours(model_dir, prompts, args, beta, out, dynamic=False, threads=1, lag=None) -> tuple[Clock, Clock]:
    """RLTrainer on `threads` intra-op threads; `lag` k: with `async_generation=True, max_lag=k` (the generation
    process runs on as many threads as the trainer's)."""
    fresh_accelerate_state()
    torch.set_num_threads(threads)
    steps, generate = Clock(), Clock()
    config = RLConfig(batch_size=args.prompts, num_generations=args.generations, max_new_tokens=args.new_tokens,
                      beta=beta, lr=1e-6, max_grad_norm=1.0, max_steps=args.warmup + args.steps, output_dir=out,
                      log_completions=0, seed=0, dynamic_sampling=dynamic, max_sample_rounds=4,
                      **({"async_generation": True, "max_lag": lag} if lag is not None else {}))
    steps.rounds, steps.ends, steps.waits = [], [], []

    def step_end(trainer, outputs):
        steps.stop()
        steps.ends.append(time.perf_counter())
        steps.rounds.append(outputs["rollout/sample_rounds"])
        generate.wall.append(outputs["time/generate_s"])  # every round's sampling (the reward functions excluded)
        steps.waits.append((outputs.get("async/generation_wait_s", 0.0), outputs.get("async/training_wait_s", 0.0)))

    trainer = RLTrainer(never_eos(LlamaForCausalLM.from_pretrained(model_dir)), config, tokenizer=make_tokenizer(),
                        train_data=[{"prompt": p} for p in prompts],
                        reward_fns=[score_has_w7 if dynamic else score_count],
                        callbacks=[LambdaCallback(on_batch_begin=lambda t, s: steps.start(), on_batch_end=step_end)])
    trainer.fit()
    return steps, generate


def run_ours_dynamic(model_dir, prompts, args, beta, out) -> tuple[Clock, Clock]:
    """RLTrainer with DAPO's dynamic sampling, on a reward where about half the groups tie (`reward_has_w7`): each
    step draws further rounds of prompts (at most 4) until it has `--prompts` groups with a spread."""
    return run_ours(model_dir, prompts, args, beta, out, dynamic=True)


def run_sync_2_threads(model_dir, prompts, args, beta, out) -> tuple[Clock, Clock]:
    """The synchronous loop given both cores: two intra-op threads for sampling and training alike."""
    return run_ours(model_dir, prompts, args, beta, out, threads=2)


def run_sync_1_thread(model_dir, prompts, args, beta, out) -> tuple[Clock, Clock]:
    """The synchronous loop on one thread: what each side of the asynchronous loop gets."""
    return run_ours(model_dir, prompts, args, beta, out, threads=1)


def run_async_1(model_dir, prompts, args, beta, out) -> tuple[Clock, Clock]:
    """`async_generation=True, max_lag=1`: one thread generating (its own process), one training."""
    return run_ours(model_dir, prompts, args, beta, out, threads=1, lag=1)


def run_async_2(model_dir, prompts, args, beta, out) -> tuple[Clock, Clock]:
    return run_ours(model_dir, prompts, args, beta, out, threads=1, lag=2)


class _StepClock(TrainerCallback):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.stop()


def run_trl(model_dir, prompts, args, beta, out, defaults=False) -> tuple[Clock, Clock]:
    """TRL's GRPOTrainer as the others run: float32, no gradient checkpointing, fused AdamW. `defaults`: with TRL's
    own precision and checkpointing instead (bf16 autocast and gradient checkpointing, as GRPOConfig sets them)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    fresh_accelerate_state()
    torch.set_num_threads(1)
    steps, generate = Clock(), Clock()
    like_ours = {} if defaults else dict(bf16=False, fp16=False, gradient_checkpointing=False)
    config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.generations,
                        num_generations=args.generations, max_completion_length=args.new_tokens, beta=beta,
                        learning_rate=1e-6, max_grad_norm=1.0, max_steps=args.warmup + args.steps,
                        loss_type="grpo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
                        report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                        use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0,
                        optim="adamw_torch_fused", weight_decay=0.0, **like_ours)  # on a GPU too: fp32, as ours
    trainer = GRPOTrainer(model=never_eos(LlamaForCausalLM.from_pretrained(model_dir)), args=config,
                          reward_funcs=[lambda completions, **kw: [reward_count(c) for c in completions]],
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=make_tokenizer(), callbacks=[_StepClock(steps)])
    trainer.remove_callback(PrinterCallback)  # it prints the run's summary dict
    trainer.model.generate = generate.timing(trainer.model.generate)
    trainer.train()
    return steps, generate


def run_trl_defaults(model_dir, prompts, args, beta, out) -> tuple[Clock, Clock]:
    return run_trl(model_dir, prompts, args, beta, out, defaults=True)


def completion_logprobs(logits_N_L_V: torch.Tensor, completion_N_C: torch.Tensor) -> torch.Tensor:
    """Log-probs of the last C tokens of each row: the logits one position before each."""
    C = completion_N_C.shape[1]
    logprobs = torch.log_softmax(logits_N_L_V[:, -C - 1:-1].float(), dim=-1)
    return logprobs.gather(-1, completion_N_C[..., None])[..., 0]


def run_hand(model_dir, prompts, args, beta, out) -> tuple[Clock, Clock]:
    """What a researcher writes without a framework: `model.generate`, then one GRPO update per rollout batch
    (group-std advantages, per-sequence mean, ratio 1, k3 KL to a frozen copy when beta > 0), clip, AdamW."""
    steps, generate = Clock(), Clock()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where Accelerate puts the trainers' models
    model = never_eos(LlamaForCausalLM.from_pretrained(model_dir)).to(device)
    reference = (never_eos(LlamaForCausalLM.from_pretrained(model_dir)).to(device).eval().requires_grad_(False)
                 if beta else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0,
                                  fused=True)  # ours: the fused kernel, no weight decay
    G = args.generations
    for start in range(0, (args.warmup + args.steps) * args.prompts, args.prompts):
        steps.start()
        prompt = tokenizer(prompts[start:start + args.prompts], return_tensors="pt", padding=True).to(device)
        generate.start()
        with torch.no_grad():
            ids_N_L = model.generate(**prompt, do_sample=True, max_new_tokens=args.new_tokens, temperature=1.0,
                                     top_k=0, top_p=1.0, num_return_sequences=G, pad_token_id=0)
        generate.stop()
        completion_N_C = ids_N_L[:, prompt["input_ids"].shape[1]:]
        rewards_N = torch.tensor([reward_count(t) for t in tokenizer.batch_decode(completion_N_C)], device=device)
        rewards_P_G = rewards_N.view(-1, G)
        std_P_1 = rewards_P_G.std(1, keepdim=True)
        advantages_N = ((rewards_P_G - rewards_P_G.mean(1, keepdim=True)) / (std_P_1 + 1e-4)).flatten()
        prompt_mask_N_P = prompt["attention_mask"].repeat_interleave(G, 0)
        attention_N_L = torch.cat([prompt_mask_N_P, torch.ones_like(completion_N_C)], 1)
        positions_N_L = (attention_N_L.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids_N_L, attention_mask=attention_N_L, position_ids=positions_N_L).logits
        logprobs_N_C = completion_logprobs(logits, completion_N_C)
        loss_N_C = -torch.exp(logprobs_N_C - logprobs_N_C.detach()) * advantages_N[:, None]
        if reference is not None:
            with torch.no_grad():
                ref_logits = reference(input_ids=ids_N_L, attention_mask=attention_N_L,
                                       position_ids=positions_N_L).logits
            ref_N_C = completion_logprobs(ref_logits, completion_N_C)
            loss_N_C = loss_N_C + beta * (torch.exp(ref_N_C - logprobs_N_C) - (ref_N_C - logprobs_N_C) - 1)
        loss_N_C.mean(1).mean().backward()  # EOS is never sampled: every completion has all its tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps.stop()
    return steps, generate


TRAINERS = {"ours": ("paperloop RLTrainer", run_ours), "trl": ("TRL GRPOTrainer", run_trl),
            "hand": ("hand-written loop", run_hand), "dynamic": ("paperloop, dynamic sampling", run_ours_dynamic),
            "trl-defaults": ("TRL GRPOTrainer, TRL's defaults (bf16 autocast, checkpointing)", run_trl_defaults)}
ASYNC = {"sync": ("synchronous, 2 threads", run_sync_2_threads), "async1": ("async, max_lag=1", run_async_1),
         "async2": ("async, max_lag=2", run_async_2), "sync1": ("synchronous, 1 thread", run_sync_1_thread)}
SYNC, SYNC_1 = ASYNC["sync"][0], ASYNC["sync1"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write every round's medians to this file (for benchmarks/ab.py)")
    parser.add_argument("--async", dest="async_", action="store_true",
                        help="the asynchronous generation table instead: the synchronous loop on 2 threads vs "
                             "async_generation with max_lag 1 and 2 (one thread generating, one training)")
    parser.add_argument("--only", nargs="+", choices=[*TRAINERS, *ASYNC],
                        help="run only these contenders (default: all of the table's); the ratios need TRL and the "
                             "hand loop (with --async: the synchronous loop)")
    args = parser.parse_args()
    table = ASYNC if args.async_ else TRAINERS
    if args.only and not set(args.only) <= set(table):
        parser.error(f"--only: {'with' if args.async_ else 'without'} --async, choose from {list(table)}")
    if args.async_ and args.warmup < 1:
        parser.error("--async: --warmup must be >= 1 (a step is timed from the end of the one before)")
    contenders = dict(table[key] for key in (args.only or table))
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    prompts = make_prompts(4 * args.prompts * (args.warmup + args.steps))  # dynamic sampling draws up to 4 rounds
    results: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model")
        for round_ in range(args.repeats):
            for beta in args.betas:
                for name, run in contenders.items():
                    out = str(Path(tmp) / f"run-{round_}-{beta:g}-{name}")  # a folder holds one run's history
                    steps, generate = run(model_dir, prompts, args, beta, out)
                    results.setdefault((name, beta), []).append(round_medians(steps, generate, args))
            print(f"round {round_ + 1}/{args.repeats} done", flush=True)
    if args.async_:
        print_async_table(results, contenders, args)
    else:
        print_table(results, contenders, args)
    if args.json:
        Path(args.json).write_text(json.dumps([{"trainer": name, "beta": beta, **{k: v for k, v in r.items()}}
                                               for (name, beta), rows in results.items() for r in rows]))


def round_medians(steps: Clock, generate: Clock, args) -> dict:
    """One run's medians over its timed steps (after `--warmup`). `loop`: the wall seconds from one step's end to
    the next's, everything the loop does included (with async generation, whatever the trainer waits for)."""
    skip = slice(args.warmup, None)
    medians = {key: statistics.median(values[skip]) for key, values in (
        ("step", steps.wall), ("step_cpu", steps.cpu), ("generate", generate.wall),
        ("rounds", getattr(steps, "rounds", [1] * len(steps.wall))))}
    ends = getattr(steps, "ends", None)
    if ends:
        medians["loop"] = statistics.median(b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:]))
        medians["generation_wait"] = statistics.median(w[0] for w in steps.waits[skip])
        medians["training_wait"] = statistics.median(w[1] for w in steps.waits[skip])
    return medians


def print_table(results, contenders, args) -> None:
    completions = args.prompts * args.generations
    print(f"\n{args.prompts} prompts x {args.generations} completions, {args.new_tokens} new tokens, one thread, "
          f"median of {args.repeats} rounds x {args.steps} steps (wall seconds; CPU: the thread's CPU seconds)\n")
    print("| beta | trainer | completions/s | s/step | generation s | training s | completions/CPU-s | vs TRL "
          "(wall) | vs TRL (CPU) | vs hand-written (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    median = lambda name, beta, key: statistics.median(r[key] for r in results[(name, beta)])  # noqa: E731

    def ratio(reference, beta, key, mine):  # a contender left out by --only: no ratio to it
        return f"{median(reference, beta, key) / mine:.2f}x" if (reference, beta) in results else "-"

    for beta in args.betas:
        for name in contenders:
            step, cpu = median(name, beta, "step"), median(name, beta, "step_cpu")
            generate = median(name, beta, "generate")
            print(f"| {beta:g} | {name} | {completions / step:.0f} | {step:.3f} | {generate:.3f} | "
                  f"{step - generate:.3f} | {completions / cpu:.0f} | {ratio('TRL GRPOTrainer', beta, 'step', step)} | "
                  f"{ratio('TRL GRPOTrainer', beta, 'step_cpu', cpu)} | "
                  f"{ratio('hand-written loop', beta, 'step_cpu', cpu)} |")
    if "paperloop, dynamic sampling" in contenders:
        rounds = statistics.median(r["rounds"] for beta in args.betas
                                   for r in results[("paperloop, dynamic sampling", beta)])
        print(f"\nDynamic sampling: on a reward where about half the groups of {args.generations} tie, a step drew a "
              f"median of {rounds:g} rounds of {args.prompts} prompts (at most 4) to train {args.prompts} groups with "
              "a spread: its s/step against paperloop's row above is what the extra prompts cost.")


def print_async_table(results, contenders, args) -> None:
    """Completions per wall second of each loop, and each round's ratio to the synchronous loop of the same round
    (interleaved: the machine's load of that moment hits both): the median ratio and its range over rounds."""
    completions = args.prompts * args.generations
    print(f"\n{args.prompts} prompts x {args.generations} completions, {args.new_tokens} new tokens, median of "
          f"{args.repeats} rounds x {args.steps} steps (wall seconds from a step's end to the next's)\n")
    print("| beta | loop | completions/s | s/step | trainer waits for generation, s/step | generation waits for "
          "trainer, s/step | vs synchronous, 2 threads: median of rounds (range) | vs synchronous, 1 thread |")
    print("|---|---|---|---|---|---|---|---|")

    def versus(reference, beta, rows):
        if (reference, beta) not in results:
            return "-"
        ratios = [s["loop"] / r["loop"] for s, r in zip(results[(reference, beta)], rows)]
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"

    for beta in args.betas:
        for name in contenders:
            rows = results[(name, beta)]
            loop = statistics.median(r["loop"] for r in rows)
            waits = [statistics.median(r[key] for r in rows) for key in ("generation_wait", "training_wait")]
            waits = ["-" if name in (SYNC, SYNC_1) else f"{w:.3f}" for w in waits]
            print(f"| {beta:g} | {name} | {completions / loop:.1f} | {loop:.3f} | {waits[0]} | {waits[1]} | "
                  f"{versus(SYNC, beta, rows)} | {versus(SYNC_1, beta, rows)} |")


if __name__ == "__main__":
    main()

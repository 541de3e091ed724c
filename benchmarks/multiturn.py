"""The cost of each turn of a multi-turn episode: paperloop's `TurnSampler` (the KV cache carried across turns, each
observation prefilled onto it) against re-reading the whole transcript every turn, as a loop built on one-shot
generation does.

    python benchmarks/multiturn.py                  # 32 episodes, 8 turns of 16 action + 32 observation tokens
    python benchmarks/multiturn.py --episodes 16 --turns 12 --repeats 5

One intra-op thread, a tiny Llama (hidden 128, 4 layers, vocab 100) built from a config. Contenders, interleaved
(one of each per round; medians over rounds):
- `TurnSampler`: sample an action, `keep` + `extend` with the observation — the transcript is never re-read;
- hand loop: `lm.sampling.sample` on the whole transcript each turn (prefill everything, then decode);
- `generate`: `model.generate(do_sample=True)` on the whole transcript each turn (TRL's tool loop without vLLM).
EOS is never drawn, so every action is exactly `--action-tokens` long: equal work. The table gives each turn's
milliseconds and its ratio to turn 1: carried over, turn k costs turn 1 plus attention over the longer cache;
re-read, it also prefills k turns of transcript again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperloop.lm.sampling import TurnSampler, sample

VOCAB, PAD = 100, 0
EOS = VOCAB  # never drawn


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=2, eos_token_id=1, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def observations(n: int, turns: int, length: int) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)] for _ in range(turns)]


def carried(model, prompts, obs, action_tokens) -> list[float]:
    generator, seconds = torch.Generator().manual_seed(0), []
    for turn, observation in enumerate(obs):
        start = time.perf_counter()
        if not turn:  # turn 1 includes the prompt's prefill, as the others' does
            sampler = TurnSampler(model, prompts, generator=generator, eos_token_id=EOS, pad_token_id=PAD)
        else:
            sampler.keep(sampler.rows)
            sampler.extend(observation)
        sampler.sample(action_tokens)
        seconds.append(time.perf_counter() - start)
    return seconds


def reread(model, prompts, obs, action_tokens, use_generate: bool) -> list[float]:
    generator, seconds = torch.Generator().manual_seed(0), []
    transcripts = [list(p) for p in prompts]
    for turn, observation in enumerate(obs):
        start = time.perf_counter()
        if turn:
            transcripts = [t + o for t, o in zip(transcripts, observation)]
        if use_generate:
            ids = torch.tensor(transcripts)  # every transcript has the same length here: no padding needed
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                     max_new_tokens=action_tokens, min_new_tokens=action_tokens, eos_token_id=EOS,
                                     pad_token_id=PAD)
            actions = out[:, ids.shape[1]:].tolist()
        else:
            actions = sample(model, transcripts, 1, action_tokens, generator=generator, eos_token_id=EOS,
                             pad_token_id=PAD).completions()
        transcripts = [t + a for t, a in zip(transcripts, actions)]
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--action-tokens", type=int, default=16)
    p.add_argument("--observation-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write each contender's per-turn medians to this file (for benchmarks/ab.py)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = make_model()
    g = torch.Generator().manual_seed(2)
    prompts = [[2] + torch.randint(3, VOCAB, (args.prompt_tokens - 1,), generator=g).tolist()
               for _ in range(args.episodes)]
    obs = observations(args.episodes, args.turns, args.observation_tokens)
    contenders = {"TurnSampler (cache carried)": lambda: carried(model, prompts, obs, args.action_tokens),
                  "sample() re-reading": lambda: reread(model, prompts, obs, args.action_tokens, False),
                  "generate() re-reading": lambda: reread(model, prompts, obs, args.action_tokens, True)}
    for run in contenders.values():  # warm-up
        run()
    times = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            times[name].append(run())
    medians = {name: [statistics.median(r[k] for r in runs) for k in range(args.turns)] for name, runs in times.items()}
    print(f"{args.episodes} episodes, {args.turns} turns of {args.action_tokens} action + {args.observation_tokens} "
          f"observation tokens after a {args.prompt_tokens}-token prompt; median of {args.repeats} interleaved runs, "
          "1 thread")
    names = list(medians)
    print("| turn | transcript tokens | " + " | ".join(f"{n} ms (x turn 1)" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    step = args.action_tokens + args.observation_tokens
    for k in range(args.turns):
        cells = " | ".join(f"{1000 * medians[n][k]:.1f} ({medians[n][k] / medians[n][0]:.2f}x)" for n in names)
        print(f"| {k + 1} | {args.prompt_tokens + k * step} | {cells} |")
    totals = {n: sum(medians[n]) for n in names}
    print("| all | | " + " | ".join(f"{1000 * totals[n]:.0f} ({totals[n] / totals[names[0]]:.2f}x ours)" for n in names)
          + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(medians))


if __name__ == "__main__":
    main()

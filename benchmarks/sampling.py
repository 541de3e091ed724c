"""Completions/s of paperloop's KV-cached sampling loop against transformers' `model.generate(do_sample=True)`.

    python benchmarks/sampling.py                    # 8 prompts x 4 samples, 16 new tokens, median of 15 runs
    python benchmarks/sampling.py --prompts 16 --samples 8 --new-tokens 32 --repeats 9

One intra-op thread, a tiny Llama (hidden 128, 4 layers, vocab 100) built from a config, prompts of 8-24
tokens. Contenders, run interleaved (one of each per round) so machine noise hits all alike:
- `sample` (prefill each prompt once, repeat its KV cache G times),
- `sample`, prompts repeated G times (prefill every copy: the other way to batch the G samples),
- `generate`: `model.generate(do_sample=True, num_return_sequences=G)`, temperature 1, no top-k/top-p,
  drawing from the global RNG (what TRL's GRPOTrainer calls).
EOS is an id outside the vocabulary, never drawn, so every contender decodes the full budget: equal work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperloop.lm.sampling import sample

VOCAB, PAD = 100, 0
EOS = VOCAB  # never drawn: every row runs to max_new_tokens in every contender


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=2, eos_token_id=1, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def make_prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 25, (n,), generator=g).tolist()
    return [[2] + torch.randint(3, VOCAB, (length - 1,), generator=g).tolist() for length in lengths]


def run_sample(model, prompts, samples, new_tokens, generator):
    return sample(model, prompts, samples, new_tokens, generator=generator, eos_token_id=EOS, pad_token_id=PAD)


def run_sample_repeated(model, prompts, samples, new_tokens, generator):
    repeated = [p for p in prompts for _ in range(samples)]
    return sample(model, repeated, 1, new_tokens, generator=generator, eos_token_id=EOS, pad_token_id=PAD)


def run_generate(model, prompts, samples, new_tokens, generator):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, num_return_sequences=samples, max_new_tokens=new_tokens,
                              eos_token_id=EOS, pad_token_id=PAD)


CONTENDERS = {"paperloop sample": run_sample, "paperloop sample, prompts repeated": run_sample_repeated,
              "transformers generate": run_generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, prompts = make_model(), make_prompts(args.prompts)
    generator = torch.Generator().manual_seed(0)
    n_completions = args.prompts * args.samples
    for fn in CONTENDERS.values():  # warm-up: first calls pay one-off costs
        fn(model, prompts, args.samples, args.new_tokens, generator)
    times = {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
        for name, fn in CONTENDERS.items():
            start = time.perf_counter()
            fn(model, prompts, args.samples, args.new_tokens, generator)
            times[name].append(time.perf_counter() - start)

    base = n_completions / statistics.median(times["transformers generate"])
    print(f"{args.prompts} prompts x {args.samples} samples, {args.new_tokens} new tokens, "
          f"median of {args.repeats} interleaved runs, 1 thread")
    print(f"| {'contender':<36} | {'ms / call':>9} | {'completions/s':>13} | {'vs generate':>11} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 15}|{'-' * 13}|")
    for name, ts in times.items():
        rate = n_completions / statistics.median(ts)
        print(f"| {name:<36} | {1e3 * statistics.median(ts):>9.1f} | {rate:>13.0f} | {rate / base:>10.2f}x |")


if __name__ == "__main__":
    main()

"""Writes tinker_distillation_reference.json: the Tinker cookbook's on-policy distillation advantages on fixed
inputs, which test_distillation.py matches (so the tests run without it). Run where `tinker-cookbook` is installed:

    python tests/rl/make_tinker_reference.py        # tinker-cookbook 0.5.8 made the file in the repository

`incorporate_kl_penalty` adds -coef x (sampled - teacher log-probs) x mask, discounted, to each datum's advantages;
stand-in datums hold fixed sampled log-probs, masks and zero advantages, and stand-in teacher clients return fixed
teacher log-probs (a leading entry for the first position, which the function drops)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import tinker
import tinker_cookbook
import torch
from tinker_cookbook.distillation.train_on_policy import incorporate_kl_penalty

g = torch.Generator().manual_seed(0)
B, T = 3, 7
SAMPLER = (-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).tolist()
TEACHER = (-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).tolist()
MASK = [[0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0]]  # a turn's tokens, then an observation


class Teacher:
    def __init__(self, logprobs):
        self.logprobs = logprobs

    async def compute_logprobs_async(self, sequence_input):
        return [None] + self.logprobs


def datum(row: int):
    inputs = {"logprobs": tinker.TensorData.from_torch(torch.tensor(SAMPLER[row], dtype=torch.float64)),
              "mask": tinker.TensorData.from_torch(torch.tensor(MASK[row], dtype=torch.float64)),
              "advantages": tinker.TensorData.from_torch(torch.zeros(T, dtype=torch.float64)),
              "target_tokens": SimpleNamespace(data=[5] * T)}
    return SimpleNamespace(loss_fn_inputs=inputs, model_input=SimpleNamespace(append_int=lambda token: None))


def advantages(coef: float, discount: float) -> list:
    data = [datum(row) for row in range(B)]
    asyncio.run(incorporate_kl_penalty(data, [Teacher(t) for t in TEACHER], [0] * B, coef, discount))
    return [d.loss_fn_inputs["advantages"].to_torch().tolist() for d in data]


if __name__ == "__main__":
    cases = [{"coef": coef, "discount": discount, "advantages": advantages(coef, discount)}
             for coef, discount in ((1.0, 0.0), (0.5, 0.9), (2.0, 1.0))]
    reference = {"tinker_cookbook": getattr(tinker_cookbook, "__version__", "0.5.8"), "sampler": SAMPLER,
                 "teacher": TEACHER, "mask": MASK, "cases": cases}
    Path(__file__).with_name("tinker_distillation_reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print([case["advantages"][0][:3] for case in cases])

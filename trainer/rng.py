"""Seeds and random number generators: one well-spread seed from several numbers (`mixed_seed`: every seed a run
derives, for data orders, episodes and processes), and the capture and restore of every generator a run draws from
(python, numpy, torch CPU/CUDA, and any `torch.Generator` a trainer owns, e.g. the one its sampling draws from)."""

from __future__ import annotations

import random

import numpy as np
import torch


def mixed_seed(*numbers: int) -> int:
    """One well-spread 63-bit seed from several numbers (e.g. run seed, epoch): seed + epoch would make run 1's
    epoch 2 the same stream as run 2's epoch 1; SeedSequence mixes them."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {name: g.get_state() for name, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["generators"]
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"rng: the checkpoint holds no state for the generator {name!r} "
                             f"(it holds {sorted(saved)})")
        generator.set_state(saved[name])


def reseed(seed: int, generators: dict[str, torch.Generator] | None = None) -> None:
    """Seed every stream afresh from `seed` (a process a checkpoint holds no streams for); each generator from
    its own mix of it and its name, so no two draw the same numbers."""
    from accelerate.utils import set_seed

    set_seed(seed % 2**32)
    for name, generator in (generators or {}).items():
        generator.manual_seed(mixed_seed(seed, *name.encode()))

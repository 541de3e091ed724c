"""Data order: which samples each optimizer step takes, as a pure function of (seed, epoch, position).

The epoch's order is a seeded permutation of sample indices that does not depend on the batch size,
cut into optimizer steps of `batch_size * grad_accum_steps * world_size` samples; each step is split
into one contiguous block per rank, and each block into micro-batches of `batch_size`. So
`batch_size=8` and `batch_size=2, grad_accum_steps=4` (or two processes of 4) see the same samples
in every optimizer step. Resuming at a position recomputes the permutation and starts at the saved
offset: nothing before it is loaded or skipped, so the cost does not depend on the position.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import TensorDataset, default_collate


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """(N,) int64 sample order of `epoch`; the same for every process and every batch size."""
    if not shuffle:
        return torch.arange(num_samples)
    # SeedSequence mixes (seed, epoch) into a well-spread seed: seed+epoch would make run 1's epoch 2
    # the same order as run 2's epoch 1.
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(mixed))


def split_step(step_indices: torch.Tensor, batch_size: int, world_size: int, rank: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one optimizer step: its contiguous block, cut into `batch_size`."""
    block = torch.tensor_split(step_indices, world_size)[rank]
    return list(torch.split(block, batch_size))


class EpochSampler:
    """The resumable data position (seed, epoch, offset) and the steps that remain in the epoch.

    `offset` counts samples of the epoch already consumed by all ranks together; it advances as each
    step is handed out, so a checkpoint written after the step resumes at the next one.
    """

    def __init__(self, num_samples: int, batch_size: int, grad_accum_steps: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True):
        if num_samples < world_size:
            raise ValueError(f"train_data has {num_samples} samples, fewer than the {world_size} processes")
        self.num_samples, self.world_size, self.rank = num_samples, world_size, rank
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.samples_per_step = batch_size * grad_accum_steps * world_size
        self.epoch, self.offset = 0, 0

    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.samples_per_step)
        return full + (rest >= self.world_size)  # a tail too small to give every rank a sample is dropped

    def steps(self) -> Iterator[tuple[list[torch.Tensor], int]]:
        """Yield (this rank's micro-batch index tensors, samples in the step over all ranks)."""
        order = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
        while self.num_samples - self.offset >= self.world_size:
            step = order[self.offset: self.offset + self.samples_per_step]
            self.offset += len(step)
            yield split_step(step, self.batch_size, self.world_size, self.rank), len(step)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = epoch, 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint data order used seed {state['seed']}, this run seed {self.seed}")
        self.epoch, self.offset = state["epoch"], state["offset"]


def eval_batches(num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[torch.Tensor]:
    """This rank's batches of an evaluation pass: a contiguous shard in order, every sample once."""
    shard = torch.tensor_split(torch.arange(num_samples), world_size)[rank]
    return list(torch.split(shard, batch_size))


def fetch(dataset, indices: torch.Tensor, collate=default_collate):
    """The batch of `dataset` at `indices`. Tensor datasets are indexed directly: per-sample
    __getitem__ and collate cost more than the step itself for small models."""
    if isinstance(dataset, TensorDataset) and collate is default_collate:
        return tuple(t[indices] for t in dataset.tensors)
    return collate([dataset[i] for i in indices.tolist()])


def check_dataset(name: str, dataset) -> int:
    """len(dataset), or a clear error when it has none or is empty."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{name} must be a map-style dataset (len() and [i]); got {type(dataset).__name__}. "
                        "Exact resume needs random access to samples by index.")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name} is empty")
    return n

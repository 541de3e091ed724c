"""Data plans for tokenized examples, each owning its batch layout: which examples a step takes, and how a
micro-batch of them becomes rows and positions. Each is `EpochPlan` with another cut of the epoch; the plan's
state stays (seed, epoch, offset) and every cut is a pure function of (seed, epoch, lengths).

    plan = PaddedPlan(lengths, pad_id, batch_size=16)                       # one example per row
    plan = BucketedPlan(lengths, pad_id, window=8, batch_size=16)           # bucket_window=8
    plan = PackedPlan(lengths, pad_id, row_len=128, rows=8, grad_accum_steps=2)  # packing=True
    batch = plan.collate(examples)          # the micro-batch's rows: padded, or packed first-fit
    plan.positions(lengths)                 # positions (real and padding) that batch has

Why these (benchmarks/packing_rows.py, one CPU thread, fwd+bwd per real token): packed rows of 2 x max_length
cost 0.74x a padded batch (half the padding, and sdpa's block-diagonal mask still costs little at that
length); rows of 16 x max_length lose the gain (1.29x: attention is T x T per row on CPU). Sorting padded steps
by length within windows of 8 steps saves about as much (0.70x), keeps one example per row, and changes which
examples share a step, not how many.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..plans import EpochPlan, epoch_permutation
from ..rng import mixed_seed
from .data import TokenizedExample, first_fit, pack_batch, pad_batch


class PaddedPlan(EpochPlan):
    """The engine's epoch plan over tokenized examples, each micro-batch one example per row, right-padded to
    its longest."""

    def __init__(self, lengths: Sequence[int], pad_id: int, batch_size: int, grad_accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 weights: torch.Tensor | None = None):
        super().__init__(len(lengths), batch_size, grad_accum_steps, world_size, rank, seed, shuffle, weights)
        self.lengths, self.pad_id = list(lengths), pad_id

    def collate(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.pad_id)

    def positions(self, lengths: Sequence[int]) -> int:
        """Positions (real and padding) of the batch `collate` builds from examples of these lengths."""
        return len(lengths) * max(lengths)


class BucketedPlan(PaddedPlan):
    """Padded steps of similar lengths: the epoch's seeded order is cut into windows of `window` steps,
    each window sorted by length (longest first) and cut into steps, and the epoch's steps are then put in
    a seeded random order (so long and short steps mix over the epoch). A step is still
    `batch_size * grad_accum_steps * world_size` examples, split as `EpochPlan` splits it, so
    `batch_size=8` and `batch_size=2, grad_accum_steps=4` take the same examples in every step."""

    def __init__(self, lengths: Sequence[int], pad_id: int, window: int, batch_size: int, grad_accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 weights: torch.Tensor | None = None):
        super().__init__(lengths, pad_id, batch_size, grad_accum_steps, world_size, rank, seed, shuffle, weights)
        self.lengths_N = torch.as_tensor(self.lengths)
        self.window = window

    def shape(self) -> dict:
        return {**super().shape(), "bucket_window": self.window}

    def epoch_steps(self, epoch: int) -> list[torch.Tensor]:
        order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        steps = []
        for chunk in torch.split(order, self.samples_per_step * self.window):
            by_length = chunk[torch.sort(self.lengths_N[chunk], descending=True, stable=True).indices]
            steps.extend(torch.split(by_length, self.samples_per_step))
        steps = [s for s in steps if len(s) >= self.world_size]
        if not self.shuffle:
            return steps
        shuffled = torch.randperm(len(steps), generator=torch.Generator().manual_seed(mixed_seed(self.seed, epoch, 1)))
        return [steps[i] for i in shuffled.tolist()]


def fill_micro_batches(order_N: torch.Tensor, lengths: Sequence[int], row_len: int, rows: int) -> list[torch.Tensor]:
    """Cut `order_N` (sample indices) into micro-batches, in order: each takes the next examples while they
    still pack first-fit into at most `rows` rows of `row_len` positions (`data.first_fit`, which collation
    then runs on the same examples in the same order, so it builds at most `rows` rows)."""
    lengths_N = [lengths[i] for i in order_N.tolist()]
    if lengths_N and max(lengths_N) > row_len:
        index = next(i for i in order_N.tolist() if lengths[i] > row_len)
        raise ValueError(f"example {index} has {lengths[index]} positions, more than row_len={row_len}")
    micro, start = [], 0
    while start < len(lengths_N):
        _, end = first_fit(lengths_N, row_len, max_rows=rows, start=start)
        micro.append(order_N[start:end])
        start = end
    return micro


class PackedPlan(EpochPlan):
    """Steps of `grad_accum_steps * world_size` micro-batches, each filled with examples (in the epoch's
    seeded order) up to `rows` rows of `row_len` positions and collated as those rows, `position_ids`
    restarting at each example; rank r takes micro-batches r*accum .. r*accum+accum-1 of each step. Short
    examples make a micro-batch hold more of them, so an epoch has fewer steps than padded batches would: a
    step's size is a token budget, not an example count.

    Epochs differ slightly in their number of steps (the order changes how examples fit); `total_steps`
    counts them exactly, and a checkpoint records the count of its own epoch.
    """

    def __init__(self, lengths: Sequence[int], pad_id: int, row_len: int, rows: int, grad_accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 weights: torch.Tensor | None = None):
        # batch_size 0: a micro-batch is no count of examples, so EpochPlan always asks split() for them.
        super().__init__(len(lengths), 0, grad_accum_steps, world_size, rank, seed, shuffle, weights)
        self.lengths, self.pad_id, self.row_len, self.rows = list(lengths), pad_id, row_len, rows
        self.micro_per_step = grad_accum_steps * world_size

    def collate(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        return pack_batch(examples, self.row_len, self.pad_id)

    def positions(self, lengths: Sequence[int]) -> int:
        """Positions (real and padding) of the rows `collate` builds from examples of these lengths."""
        return len(first_fit(lengths, self.row_len)[0]) * self.row_len

    def epoch_steps(self, epoch: int) -> list[torch.Tensor]:
        order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        micro = fill_micro_batches(order, self.lengths, self.row_len, self.rows)
        steps = [torch.cat(micro[i:i + self.micro_per_step]) for i in range(0, len(micro), self.micro_per_step)]
        return steps if len(steps[-1]) >= self.world_size else steps[:-1]

    def split(self, step_indices: torch.Tensor) -> list[torch.Tensor]:
        # The fill restarts at each step's first example, so cutting the step again gives the epoch's cut.
        micro = fill_micro_batches(step_indices, self.lengths, self.row_len, self.rows)
        if len(micro) < self.world_size:  # the epoch's short last step: one share of its examples per rank
            return [torch.tensor_split(step_indices, self.world_size)[self.rank]]
        return [micro[i] for i in torch.tensor_split(torch.arange(len(micro)), self.world_size)[self.rank].tolist()]

    def steps_per_epoch(self) -> int:
        return len(self._steps_of(self.epoch))

    def total_steps(self, epochs: int) -> int:  # packed epochs differ a little in length: count each
        return sum(len(self.epoch_steps(epoch)) for epoch in range(epochs))

    def shape(self) -> dict:
        # The step count of an epoch depends on the epoch's order, so it is checked for the checkpoint's epoch.
        return {"num_samples": self.num_samples, "row_len": self.row_len, "rows": self.rows,
                "micro_batches_per_step": self.micro_per_step}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch_steps": len(self._steps_of(self.epoch))}

    def load_state_dict(self, state: dict) -> None:
        before = self.epoch, self.offset
        super().load_state_dict({k: v for k, v in state.items() if k != "epoch_steps"})  # seed and shape
        count = len(self.epoch_steps(state["epoch"]))
        if state["epoch_steps"] != count:
            self.epoch, self.offset = before  # nothing loaded on error
            raise ValueError(f"data plan: the checkpoint's epoch {state['epoch']} has {state['epoch_steps']} packed "
                             f"steps, this run's {count} (changed data or max_length); resume with the same ones")

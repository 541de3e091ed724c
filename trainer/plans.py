"""Data plans: which samples each loop step takes, as a pure function of (seed, epoch, position).

The default plan, `EpochPlan`, orders each epoch by a seeded permutation of sample indices that does
not depend on the batch size, and cuts it into steps of `batch_size * grad_accum_steps * world_size`
samples; each step is split into one contiguous block per rank, and each block into micro-batches of
`batch_size`. So `batch_size=8` and `batch_size=2, grad_accum_steps=4` (or two processes of 4) see the
same samples in every step.

A sample may carry a weight known before its step runs (default 1; SFT: its trained tokens). A step
tells each rank the weight of each of its micro-batches and the whole step's weight over every rank:
every rank computes the same numbers from the same indices, so weighting the loss costs no
communication. A plan's state is (seed, epoch, offset in steps): resuming recomputes the epoch's cut
and starts at the offset, loading and skipping nothing before it.

A new plan (e.g. steps filled by a token budget from known lengths) subclasses `EpochPlan` and
overrides `epoch_steps` (how an epoch is cut into steps) and, if it must, `split` (how a step is cut
into this rank's micro-batches) and `collate` (how a micro-batch's samples become one batch: the
language-model plans pad or pack rows; the default leaves it to the trainer's `collate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import TensorDataset, default_collate

from .rng import mixed_seed


@dataclass(frozen=True)
class Step:
    """One loop step, as this process sees it."""

    micro_batches: tuple[torch.Tensor, ...]  # this process's sample indices, one (b,) tensor per micro-batch
    micro_weights: tuple[float, ...]  # summed sample weight of each micro-batch
    weight: float  # summed sample weight of the whole step, over every process
    samples: int  # samples in the whole step, over every process

    def shares(self) -> list[float]:
        """Each micro-batch's part of the step's weight: the factor its mean loss is scaled by."""
        return [w / self.weight for w in self.micro_weights]


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """(N,) int64 sample order of `epoch`; the same for every process and every batch size."""
    if not shuffle:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(mixed_seed(seed, epoch)))


def split_step(step_indices: torch.Tensor, batch_size: int, world_size: int, rank: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one step: its contiguous block, cut into `batch_size`."""
    block = torch.tensor_split(step_indices, world_size)[rank]
    return list(torch.split(block, batch_size))


class EpochPlan:
    """The resumable data position (seed, epoch, offset) and the steps that remain in the epoch.

    `offset` counts the epoch's steps already taken; the trainer advances it as soon as a step's update is
    done, so a checkpoint written after the step resumes at the next one. `weights` is an optional (N,) tensor of
    per-sample weights (default: every sample weighs 1).
    """

    # How a training micro-batch's samples become one batch, when the plan decides it (a plan that packs
    # examples into rows must also build those rows); None: the trainer's `collate`.
    collate = None

    def __init__(self, num_samples: int, batch_size: int, grad_accum_steps: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True, weights: torch.Tensor | None = None):
        if num_samples < world_size:
            raise ValueError(f"train_data has {num_samples} samples, fewer than the {world_size} processes")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
            if weights.shape != (num_samples,):
                raise ValueError(f"sample weights: expected shape ({num_samples},), got {tuple(weights.shape)}")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("sample weights: every weight must be finite and >= 0")
        self.num_samples, self.world_size, self.rank = num_samples, world_size, rank
        self.batch_size, self.seed, self.shuffle, self.weights = batch_size, seed, shuffle, weights
        self.samples_per_step = batch_size * grad_accum_steps * world_size
        self.epoch, self.offset = 0, 0
        self._cut: tuple[int, list[torch.Tensor]] | None = None  # (epoch, its steps): computed once per epoch

    def epoch_steps(self, epoch: int) -> list[torch.Tensor]:
        """Every step of `epoch` as its sample indices over all ranks. A tail too small to give every
        rank a sample is dropped."""
        order = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        steps = list(torch.split(order, self.samples_per_step))
        return steps if len(steps[-1]) >= self.world_size else steps[:-1]

    def split(self, step_indices: torch.Tensor) -> list[torch.Tensor]:
        return split_step(step_indices, self.batch_size, self.world_size, self.rank)

    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.samples_per_step)
        return full + (rest >= self.world_size)

    def total_steps(self, epochs: int) -> int:
        """Steps in the first `epochs` epochs (a plan whose epochs differ in length counts each)."""
        return epochs * self.steps_per_epoch()

    def _steps_of(self, epoch: int) -> list[torch.Tensor]:
        if self._cut is None or self._cut[0] != epoch:
            self._cut = (epoch, self.epoch_steps(epoch))
        return self._cut[1]

    def steps(self) -> Iterator[Step]:
        """The steps that remain in the current epoch. The consumer calls `advance()` once it has taken a
        step: a step abandoned before that (an exception) is handed out again."""
        all_steps = self._steps_of(self.epoch)
        while self.offset < len(all_steps):
            yield self.make_step(all_steps[self.offset])

    def advance(self) -> None:
        self.offset += 1

    def epoch_done(self) -> bool:
        return self.offset >= len(self._steps_of(self.epoch))

    def make_step(self, step_indices: torch.Tensor) -> Step:
        if self.world_size == 1 and len(step_indices) <= self.batch_size:  # the common case, kept cheap
            micro_batches = (step_indices,)
        else:
            micro_batches = tuple(self.split(step_indices))
        if self.weights is None:
            return Step(micro_batches, tuple(float(len(mb)) for mb in micro_batches), float(len(step_indices)),
                        len(step_indices))
        weight = float(self.weights[step_indices].sum())
        if weight <= 0:
            raise ValueError(f"a step of samples {step_indices.tolist()[:8]}... has total weight 0: nothing to train")
        return Step(micro_batches, tuple(float(self.weights[mb].sum()) for mb in micro_batches), weight,
                    len(step_indices))

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = epoch, 0

    def shape(self) -> dict:
        """What the position means: a checkpoint's offset fits only a plan of the same shape."""
        return {"num_samples": self.num_samples, "samples_per_step": self.samples_per_step,
                "steps_per_epoch": self.steps_per_epoch()}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset, **self.shape()}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data plan: the checkpoint's data order used seed {state['seed']}, this run "
                             f"seed {self.seed}; resume with the same seed")
        for key, value in self.shape().items():
            if state[key] != value:
                raise ValueError(f"data plan: the checkpoint's {key} is {state[key]}, this run's {value} (a "
                                 "changed dataset, batch size, accumulation or process count); resume with the "
                                 "same ones")
        epoch, offset = state["epoch"], state["offset"]
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"data plan: the checkpoint's epoch is {epoch!r}, not an epoch (an integer >= 0)")
        if type(offset) is not int or not 0 <= offset <= self.offset_limit(epoch):
            raise ValueError(f"data plan: the checkpoint's offset is {offset!r}, outside the 0 .. "
                             f"{self.offset_limit(epoch)} steps a position in its epoch can hold")
        self.epoch, self.offset = epoch, offset

    def offset_limit(self, epoch: int) -> int:
        """The largest offset a position in `epoch` can hold: the epoch's step count (all of them taken, the epoch
        not yet closed). A plan whose steps may take the next epoch's steps too says so here."""
        return len(self._steps_of(epoch))


def eval_batches(num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[torch.Tensor]:
    """This rank's batches of an evaluation pass: a contiguous shard in order, every sample once."""
    shard = torch.tensor_split(torch.arange(num_samples), world_size)[rank]
    return list(torch.split(shard, batch_size))


def lockstep_eval_batches(num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0,
                          lockstep: bool = True) -> list[tuple[torch.Tensor, bool]]:
    """(indices, real) of this rank's evaluation batches. `lockstep` (a sharded (FSDP) model, whose every forward
    is a collective): as many on every rank, a rank with fewer batches than rank 0 (whose shard is the largest)
    running batches of sample 0, `real` False, whose results it throws away."""
    mine = [(indices, True) for indices in eval_batches(num_samples, batch_size, world_size, rank)]
    most = len(eval_batches(num_samples, batch_size, world_size, 0)) if lockstep else len(mine)
    return mine + [(torch.zeros(1, dtype=torch.long), False)] * (most - len(mine))


def fetch(dataset, indices: torch.Tensor, collate=default_collate):
    """The batch of `dataset` at `indices`. Tensor datasets are indexed directly: per-sample
    __getitem__ and collate cost more than the step itself for small models."""
    if isinstance(dataset, TensorDataset) and collate is default_collate:
        return tuple(t[indices] for t in dataset.tensors)
    samples = [dataset[i] for i in indices.tolist()]
    if collate is not default_collate:
        return collate(samples)
    try:
        return collate(samples)
    except RuntimeError as e:
        if "equal size" not in str(e) and "stack expects" not in str(e):
            raise
        raise ValueError(f"samples {indices.tolist()[:8]} have different shapes, so default_collate cannot stack "
                         f"them ({str(e).splitlines()[0]}); write a `collate(self, samples)` method on the "
                         "trainer that pads them into a batch") from None


def check_dataset(name: str, dataset) -> int:
    """len(dataset), or a clear error when it has none, is empty, or is a DataFrame."""
    if (why := dataframe_problem(name, dataset)) is not None:
        raise TypeError(why)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{name} must be a map-style dataset (len() and [i]); got {type(dataset).__name__}. "
                        "Exact resume needs random access to samples by index.")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name} is empty")
    return n


def dataframe_problem(name: str, data) -> str | None:
    """Why `data` cannot be a dataset when it is a DataFrame (pandas, polars, ...), else None. A DataFrame has a
    length and [ ], but its [0] selects a column named 0, not the first row: a bare `KeyError: 0` later on."""
    kind = type(data)
    if kind.__name__ != "DataFrame":
        return None
    return (f"{name}: is a {kind.__module__.split('.')[0]} DataFrame, whose [i] selects a column, not a row; give "
            "a dataset of rows: datasets.Dataset.from_pandas(df) (for tensors, with .with_format('torch')), or a "
            "list of dicts (df.to_dict('records'))")

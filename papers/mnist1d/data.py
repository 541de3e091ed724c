"""MNIST-1D, generated locally by the `mnist1d` package (never its download path)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def generate(data_seed: int = 42) -> dict:
    """The paper's dataset: 4,000 train and 1,000 test signals of length 40, 10 classes."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = data_seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave the caller's alone
    try:
        return make_dataset(args)
    finally:
        np.random.set_state(state)


def position_permutation(length: int, seed: int) -> torch.Tensor:
    """The one fixed permutation of positions applied to every signal, train and test alike."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))


def datasets(raw: dict, shuffled: bool, permutation_seed: int) -> tuple[TensorDataset, TensorDataset]:
    x_train, x_test = (torch.as_tensor(raw[k], dtype=torch.float32) for k in ("x", "x_test"))
    if shuffled:
        perm = position_permutation(x_train.shape[1], permutation_seed)
        x_train, x_test = x_train[:, perm], x_test[:, perm]
    y_train, y_test = (torch.as_tensor(raw[k], dtype=torch.long) for k in ("y", "y_test"))
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)

"""pass@k, the unbiased estimator of Chen et al. (2021): how often k samples hold a right one."""

from __future__ import annotations

import numpy as np
import torch


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", §2.1).

    pass@k = 1 - C(n - c, k) / C(n, k) for a problem with n samples of which c are correct, computed in the
    paper's stable product form 1 - Π_{i=n-c+1}^{n} (1 - k / i) (no huge binomials). n, c and k broadcast
    against each other (numbers, arrays or tensors: one value per problem, and/or several k). Returns a
    numpy float64 array of the broadcast shape (a numpy float64 scalar, which is a python float, when all
    three are scalars). Average over problems yourself. Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    n_, c_, k_ = (_as_count(value, name) for value, name in ((n, "n"), (c, "c"), (k, "k")))
    n_, c_, k_ = np.broadcast_arrays(n_, c_, k_)
    if np.any(c_ < 0) or np.any(c_ > n_):
        raise ValueError("c (correct samples) must satisfy 0 <= c <= n")
    if np.any(k_ < 1) or np.any(k_ > n_):
        raise ValueError("k must satisfy 1 <= k <= n (pass@k needs at least k samples)")
    # Factors for i = n - c + 1 + j, j < c; the grid runs to the largest c and pads with 1. When n - c < k every
    # draw of k holds a correct sample (pass@k = 1) and the product would meet a factor <= 0, so it is masked.
    j_C = np.arange(int(c_.max()) if c_.size else 0, dtype=np.float64)
    i_C = (n_ - c_ + 1)[..., None] + j_C
    factors = np.where(j_C < c_[..., None], 1.0 - k_[..., None] / np.maximum(i_C, 1.0), 1.0)
    result = np.where(n_ - c_ < k_, 1.0, 1.0 - np.prod(factors, axis=-1))
    return result[()] if result.ndim == 0 else result


def _as_count(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be integer counts, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise ValueError(f"{name} must be integer counts, got {value!r}")
    return array.astype(np.int64)


def pass_at_powers(n: int, passed_P) -> dict[str, float]:
    """{"pass@k": mean over problems} for k = 1, 2, 4, ..., n (and n itself): `passed_P` counts each problem's
    passing samples out of n."""
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
    return {f"pass@{k}": float(pass_at_k(n, passed_P, k).mean()) for k in ks}

"""The math of policy-gradient RL for language models (GRPO family), as pure functions chosen by name.

    from paperloop.rl import group_advantages, policy_loss, aggregation_weights, pass_at_k

    advantages_B = group_advantages(rewards_B, group_size=8, normalize="group_std")
    loss, metrics = policy_loss(logprobs_B_T, old_logprobs_B_T, advantages_B, mask_B_T,
                                clip_low=0.2, clip_high=0.28, aggregation="token_mean")

Rows are grouped consecutively: with group size G, group g is rows g*G .. g*G+G-1 (the G completions of one
prompt). Nothing here knows about trainers, models or devices; `RLTrainer` calls these functions, and a paper
variant is a new function registered by name (`@register_advantage`, `@register_aggregation`), never a new
branch inside a trainer.

The published recipes, as options:

| recipe | normalize | aggregation | clipping |
|---|---|---|---|
| GRPO (Shao et al. 2024, DeepSeekMath) | `group_std` | `sequence_mean` | clip_low = clip_high = 0.2 |
| DAPO (Yu et al. 2025) | `group_std` | `token_mean` | clip-higher: clip_high (0.28) > clip_low (0.2) |
| Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") | `none` | `constant` | as GRPO |

Accumulation. Every aggregation is a weighted mean of one value per sequence:

    policy_loss = Σ_b w_b · v_b / Σ_b w_b,   w_B = aggregation_weights(mask_B_T, aggregation, max_tokens)

so a trainer that splits a minibatch into micro-batches k reproduces the whole minibatch's loss and gradient
exactly by giving micro-batch k the share W_k / W of the update (W_k = Σ of its w_b): this is the engine's
weighted step, with w_b as each sample's weight.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np
import torch

__all__ = ["group_advantages", "policy_loss", "aggregation_weights", "k3_kl", "zero_std_fraction", "pass_at_k",
           "masked_mean", "register_advantage", "register_aggregation", "ADVANTAGE_NORMALIZERS", "AGGREGATIONS"]

# TRL's GRPOTrainer adds this to the standard deviation; the same constant makes our advantages comparable.
STD_EPS = 1e-4

ADVANTAGE_NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
AGGREGATIONS: dict[str, Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]] = {}


def register_advantage(name: str):
    """Register `fn(rewards_N_G) -> advantages_N_G` (N groups of G) under `name` for `group_advantages`.

    `group_advantages` sets the advantages of groups whose rewards are all equal to exactly 0 afterwards.
    """
    def register(fn):
        ADVANTAGE_NORMALIZERS[name] = fn
        return fn
    return register


def register_aggregation(name: str):
    """Register `fn(mask_B_T, max_tokens) -> (weight_B, denominator_B)` under `name` for `policy_loss`.

    The loss is Σ_b weight_b · (Σ_t ℓ_bt m_bt / denominator_b) / Σ_b weight_b; see the module docstring.
    """
    def register(fn):
        AGGREGATIONS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------

@register_advantage("group_std")
def _group_std(rewards_N_G: torch.Tensor) -> torch.Tensor:
    """GRPO (Shao et al. 2024, eq. in §4.1.2): Â = (r - mean(group)) / std(group), std with Bessel's correction
    and + 1e-4 as in TRL. Scales each prompt's advantages to unit spread, whatever its difficulty."""
    mean_N_1 = rewards_N_G.mean(dim=1, keepdim=True)
    std_N_1 = rewards_N_G.std(dim=1, keepdim=True)  # correction=1 (Bessel), like TRL
    return (rewards_N_G - mean_N_1) / (std_N_1 + STD_EPS)


@register_advantage("batch_std")
def _batch_std(rewards_N_G: torch.Tensor) -> torch.Tensor:
    """Centre within the group, scale by the whole batch's std (Bessel): keeps GRPO's baseline without its
    per-prompt up-weighting of nearly-solved and nearly-failed prompts (TRL's `scale_rewards="batch"`)."""
    mean_N_1 = rewards_N_G.mean(dim=1, keepdim=True)
    return (rewards_N_G - mean_N_1) / (rewards_N_G.std() + STD_EPS)


@register_advantage("none")
def _mean_centred(rewards_N_G: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, §3.1): Â = r - mean(group). Dividing by the group std biases updates towards
    prompts that are too easy or too hard; Dr. GRPO drops it."""
    return rewards_N_G - rewards_N_G.mean(dim=1, keepdim=True)


def group_advantages(rewards_B: torch.Tensor, group_size: int, normalize: str = "group_std") -> torch.Tensor:
    """Advantages (B,) from rewards (B,), rows grouped consecutively in groups of `group_size`.

    normalize: "group_std" (GRPO): (r - mean_group) / (std_group + 1e-4); "batch_std": (r - mean_group) /
    (std_batch + 1e-4); "none" (Dr. GRPO): r - mean_group. Stds use Bessel's correction, as TRL does.
    Any name registered with `register_advantage` works. Raises ValueError naming the bad argument.
    """
    normalizer = _lookup(ADVANTAGE_NORMALIZERS, normalize, "normalize")
    rewards_N_G = _grouped(rewards_B, group_size)
    rewards_N_G = rewards_N_G.to(torch.promote_types(rewards_N_G.dtype, torch.float32))
    advantages_N_G = normalizer(rewards_N_G)
    # A flat group's mean can round away from its rewards (mean of three 0.7s is not 0.7), leaving ~1e-12 after
    # division by std + 1e-4; such groups carry no signal, so their advantages are exactly 0.
    flat_N_1 = (rewards_N_G.amax(dim=1) == rewards_N_G.amin(dim=1))[:, None]
    return advantages_N_G.masked_fill(flat_N_1, 0.0).reshape(-1)


def zero_std_fraction(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Fraction (0-dim tensor) of groups whose rewards are all equal: their advantages are 0 and they teach nothing."""
    rewards_N_G = _grouped(rewards_B, group_size)
    flat_N = rewards_N_G.amax(dim=1) == rewards_N_G.amin(dim=1)
    return flat_N.float().mean()


def _grouped(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(rewards_B, torch.Tensor):
        rewards_B = torch.as_tensor(rewards_B)
    if rewards_B.ndim != 1 or rewards_B.numel() == 0:
        raise ValueError(f"rewards_B must be a non-empty 1-D tensor, got shape {tuple(rewards_B.shape)}")
    if rewards_B.is_complex() or rewards_B.dtype == torch.bool:
        raise ValueError(f"rewards_B must be real numbers, got dtype {rewards_B.dtype}")
    if not _is_int(group_size) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group of one has no baseline), got {group_size!r}")
    if rewards_B.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {rewards_B.numel()} rewards")
    if rewards_B.is_floating_point() and not bool(torch.isfinite(rewards_B).all()):
        raise ValueError("rewards_B contains NaN or infinite values")
    return rewards_B.reshape(-1, group_size)


# ---------------------------------------------------------------------------------------------------------------
# Aggregations: (weight_B, denominator_B) with loss = Σ_b w_b Σ_t ℓ m / d_b / Σ_b w_b
# ---------------------------------------------------------------------------------------------------------------

@register_aggregation("sequence_mean")
def _sequence_mean(mask_B_T: torch.Tensor, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024, eq. 3): (1/G) Σ_i (1/|o_i|) Σ_t ℓ_it — each sequence's mean, then the mean over
    sequences. Every sequence counts equally, so a token of a long answer weighs less (the length bias Dr. GRPO
    points out). A sequence with no trained tokens still counts in the mean, with value 0, as in TRL."""
    tokens_B = mask_B_T.sum(dim=1)
    return torch.ones_like(tokens_B), _nonzero(tokens_B)


@register_aggregation("token_mean")
def _token_mean(mask_B_T: torch.Tensor, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO (Yu et al. 2025, §3.3, token-level policy gradient loss): Σ_i Σ_t ℓ_it / Σ_i |o_i| — every token
    weighs the same, so long sequences are not diluted."""
    tokens_B = mask_B_T.sum(dim=1)
    return tokens_B, _nonzero(tokens_B)


@register_aggregation("constant")
def _constant(mask_B_T: torch.Tensor, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (Liu et al. 2025, §3.1): Σ_i Σ_t ℓ_it / (B · max_tokens) — a fixed normalizer independent of the
    lengths sampled, which removes GRPO's length bias (the paper divides by the generation budget)."""
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int for aggregation='constant', got {max_tokens!r}")
    ones_B = torch.ones(mask_B_T.shape[0], dtype=mask_B_T.dtype, device=mask_B_T.device)
    return ones_B, ones_B * max_tokens


def _nonzero(tokens_B: torch.Tensor) -> torch.Tensor:
    # An all-masked sequence has numerator 0; dividing by 1 instead of 0 makes its value 0 rather than NaN.
    return torch.where(tokens_B > 0, tokens_B, torch.ones_like(tokens_B))


def aggregation_weights(mask_B_T: torch.Tensor, aggregation: str = "sequence_mean",
                        max_tokens: int | None = None) -> torch.Tensor:
    """Per-sequence weights w_B with policy_loss(batch) = Σ_b w_b · v_b / Σ_b w_b.

    sequence_mean: 1 per sequence; token_mean: its number of trained tokens (Σ_t mask); constant: 1.
    A trainer splitting a minibatch into micro-batches weighs micro-batch k's loss by Σ_{b in k} w_b / Σ_b w_b
    (the engine's per-sample weights) and gets the whole minibatch's loss and gradient exactly.
    """
    mask_B_T = _as_mask(mask_B_T)
    return _lookup(AGGREGATIONS, aggregation, "aggregation")(mask_B_T, max_tokens)[0]


# ---------------------------------------------------------------------------------------------------------------
# Policy loss
# ---------------------------------------------------------------------------------------------------------------

def k3_kl(ref_logprobs_B_T: torch.Tensor, logprobs_B_T: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per token, as in GRPO (Shao et al. 2024, eq. 4) and TRL:
    exp(ref - logp) - (ref - logp) - 1. Non-negative, unbiased for samples from π_θ, low variance."""
    return _k3(ref_logprobs_B_T - logprobs_B_T)


def _k3(log_ratio_B_T: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio_B_T) - log_ratio_B_T - 1


def policy_loss(logprobs_B_T: torch.Tensor, old_logprobs_B_T: torch.Tensor, advantages_B: torch.Tensor,
                mask_B_T: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                aggregation: str = "sequence_mean", max_tokens: int | None = None,
                ref_logprobs_B_T: torch.Tensor | None = None, beta: float = 0.0, *,
                entropy_B_T: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate with separate low/high clip and an optional k3 KL penalty, aggregated by name.

    Per token: ℓ = -min(ρ·A, clip(ρ, 1 - clip_low, 1 + clip_high)·A) + beta·k3(ref, logprobs), ρ = exp(logprobs -
    old). Aggregations: "sequence_mean" (GRPO) mean over sequences of Σ_t ℓ·m / Σ_t m; "token_mean" (DAPO)
    Σ ℓ·m / Σ m; "constant" (Dr. GRPO) Σ ℓ·m / (B · max_tokens). `mask_B_T` is 1 on trained (completion) tokens
    and 0 on prompt and padding; fractional values weigh tokens. Gradient flows only through `logprobs_B_T`.

    Returns (loss, metrics). Metrics are 0-dim tensors (no host sync), token means over the mask:
    `policy/clip_frac_low` (ρ < 1 - clip_low with A < 0: the clip is active and the token gets no gradient),
    `policy/clip_frac_high` (ρ > 1 + clip_high with A > 0), `policy/clip_frac` (either), `policy/ratio_mean`,
    `policy/kl` (k3, when `ref_logprobs_B_T` is given, whatever beta), `policy/entropy` (when the caller passes
    per-token entropies `entropy_B_T`, e.g. from `torch.distributions.Categorical(logits=...).entropy()`).
    """
    _check_loss_inputs(logprobs_B_T, old_logprobs_B_T, advantages_B, mask_B_T, clip_low, clip_high,
                       ref_logprobs_B_T, beta, entropy_B_T)
    aggregate = _lookup(AGGREGATIONS, aggregation, "aggregation")
    mask_B_T = _as_mask(mask_B_T).to(logprobs_B_T.dtype)

    # Untrained positions (prompt, padding) may hold anything, -inf included: they are replaced by a log-ratio of 0
    # *before* exp, so that neither the loss (inf * 0) nor the gradient (0 * inf through exp) turns into NaN.
    trained_B_T = mask_B_T != 0
    advantages_B_1 = advantages_B.detach().to(logprobs_B_T.dtype)[:, None]
    ratio_B_T = torch.exp(torch.where(trained_B_T, logprobs_B_T - old_logprobs_B_T.detach(), 0.0))
    clipped_B_T = torch.clamp(ratio_B_T, 1 - clip_low, 1 + clip_high)
    loss_B_T = -torch.minimum(ratio_B_T * advantages_B_1, clipped_B_T * advantages_B_1)
    kl_B_T = None
    if ref_logprobs_B_T is not None:
        kl_B_T = _k3(torch.where(trained_B_T, ref_logprobs_B_T.detach() - logprobs_B_T, 0.0))
        if beta > 0:  # with beta = 0 the KL is only reported; 0 * inf would poison the loss with NaN
            loss_B_T = loss_B_T + beta * kl_B_T

    weight_B, denominator_B = aggregate(mask_B_T, max_tokens)
    value_B = (loss_B_T * mask_B_T).sum(dim=1) / denominator_B  # (B,) the per-sequence value v_b
    loss = (weight_B * value_B).sum() / _nonzero(weight_B.sum())

    with torch.no_grad():
        low_B_T = (ratio_B_T < 1 - clip_low) & (advantages_B_1 < 0)
        high_B_T = (ratio_B_T > 1 + clip_high) & (advantages_B_1 > 0)
        metrics = {"policy/clip_frac_low": masked_mean(low_B_T, mask_B_T),
                   "policy/clip_frac_high": masked_mean(high_B_T, mask_B_T),
                   "policy/clip_frac": masked_mean(low_B_T | high_B_T, mask_B_T),
                   "policy/ratio_mean": masked_mean(ratio_B_T, mask_B_T)}
        if kl_B_T is not None:
            metrics["policy/kl"] = masked_mean(kl_B_T, mask_B_T)
        if entropy_B_T is not None:
            metrics["policy/entropy"] = masked_mean(entropy_B_T, mask_B_T)
    return loss, metrics


def masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Σ values · mask / Σ mask, detached; values where the mask is 0 may be anything (-inf, NaN)."""
    values_B_T = torch.where(mask_B_T != 0, values_B_T.detach().to(mask_B_T.dtype), 0.0)
    return (values_B_T * mask_B_T).sum() / _nonzero(mask_B_T.sum())


def _as_mask(mask_B_T: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask_B_T, torch.Tensor) or mask_B_T.ndim != 2:
        raise ValueError(f"mask_B_T must be a 2-D tensor (B, T), got {getattr(mask_B_T, 'shape', type(mask_B_T))}")
    return mask_B_T if mask_B_T.is_floating_point() else mask_B_T.float()


def _check_loss_inputs(logprobs_B_T, old_logprobs_B_T, advantages_B, mask_B_T, clip_low, clip_high,
                       ref_logprobs_B_T, beta, entropy_B_T) -> None:
    if not isinstance(logprobs_B_T, torch.Tensor) or logprobs_B_T.ndim != 2 or not logprobs_B_T.is_floating_point():
        raise ValueError(f"logprobs_B_T must be a 2-D float tensor (B, T), got "
                         f"{getattr(logprobs_B_T, 'shape', type(logprobs_B_T))}")
    shape = tuple(logprobs_B_T.shape)
    named = {"old_logprobs_B_T": old_logprobs_B_T, "mask_B_T": mask_B_T, "ref_logprobs_B_T": ref_logprobs_B_T,
             "entropy_B_T": entropy_B_T}
    for name, tensor in named.items():
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape):
            raise ValueError(f"{name} must have the shape of logprobs_B_T {shape}, got "
                             f"{getattr(tensor, 'shape', type(tensor))}")
    if not isinstance(advantages_B, torch.Tensor) or tuple(advantages_B.shape) != shape[:1]:
        raise ValueError(f"advantages_B must have shape ({shape[0]},), got "
                         f"{getattr(advantages_B, 'shape', type(advantages_B))}")
    if not (_is_real(clip_low) and 0 <= clip_low < 1):
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not (_is_real(clip_high) and 0 <= clip_high < math.inf):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high!r}")
    if not (_is_real(beta) and 0 <= beta < math.inf):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs_B_T is None:
        raise ValueError(f"beta={beta} needs ref_logprobs_B_T (the reference model's log-probs)")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _lookup(registry: dict, name: str, argument: str):
    if name not in registry:
        raise ValueError(f"unknown {argument} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------

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

"""Policy losses for language models (GRPO family) and the aggregations that reduce them: pure functions chosen by
name, as verl's `core_algos` does.

    loss, metrics = policy_loss(logprobs_B_T, old_logprobs_B_T, advantages_B, weights_B_T, loss="ppo_clip",
                                aggregation="token_mean", clip_low=0.2, clip_high=0.28)

A policy loss is per token, registered with `@register_policy_loss("name")`: `fn(log_ratio_B_T, advantages_B_1,
trained_B_T, *, clip_low, clip_high) -> (loss_B_T, clipped)`, where `clipped` maps "low" and "high" to the (B, T)
bool tokens whose gradient its clip stops. `policy_loss` adds the KL penalty, aggregates by name and reports
metrics, the same for every loss. A paper's new loss is a new registered function, never a branch in a trainer.

The published recipes, as options:

| recipe | advantage | aggregation | loss |
|---|---|---|---|
| GRPO (Shao et al. 2024, DeepSeekMath) | `group_std` | `sequence_mean` | `ppo_clip`, clip_low = clip_high = 0.2 |
| DAPO (Yu et al. 2025) | `group_std` | `token_mean` | `ppo_clip` with clip-higher: clip_high (0.28) > clip_low (0.2) |
| Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") | `none` | `constant` | `ppo_clip` as GRPO |

Accumulation. Every aggregation is a weighted mean of one value per sequence:

    policy_loss = Σ_b w_b · v_b / Σ_b w_b,   w_B = aggregation_weights(weights_B_T, aggregation, max_tokens)

so a trainer that splits a minibatch into micro-batches k reproduces the whole minibatch's loss and gradient
exactly by giving micro-batch k the share W_k / W of the update (W_k = Σ of its w_b): this is the engine's
weighted step, with w_b as each sample's weight.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .registry import is_int, is_real, lookup, registrar

AGGREGATIONS: dict[str, Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}

register_aggregation = registrar(AGGREGATIONS, "aggregation", """Register `fn(weights_B_T, max_tokens) ->
(weight_B, denominator_B)` under a new name for `policy_loss` (a taken name is refused). The loss is
Σ_b weight_b · (Σ_t ℓ_bt m_bt / denominator_b) / Σ_b weight_b; see the module docstring.""")

register_policy_loss = registrar(POLICY_LOSSES, "policy loss", """Register `fn(log_ratio_B_T, advantages_B_1,
trained_B_T, *, clip_low, clip_high) -> (loss_B_T, clipped)` under a new name for `policy_loss` (a taken name is
refused). `log_ratio_B_T` is logπ - logπ_old, with gradient through logπ and 0 at untrained positions; `clipped`
maps "low" and "high" to the (B, T) bool tokens the loss's clip keeps from the gradient.""")


# ---------------------------------------------------------------------------------------------------------------
# Aggregations: (weight_B, denominator_B) with loss = Σ_b w_b Σ_t ℓ m / d_b / Σ_b w_b
# ---------------------------------------------------------------------------------------------------------------

@register_aggregation("sequence_mean")
def _sequence_mean(weights_B_T: torch.Tensor, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024, eq. 3): (1/G) Σ_i (1/|o_i|) Σ_t ℓ_it — each sequence's mean, then the mean over
    sequences. Every sequence counts equally, so a token of a long answer weighs less (the length bias Dr. GRPO
    points out). A sequence with no trained tokens still counts in the mean, with value 0, as in TRL."""
    tokens_B = weights_B_T.sum(dim=1)
    return torch.ones_like(tokens_B), _nonzero(tokens_B)


@register_aggregation("token_mean")
def _token_mean(weights_B_T: torch.Tensor, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO (Yu et al. 2025, §3.3, token-level policy gradient loss): Σ_i Σ_t ℓ_it / Σ_i |o_i| — every token
    weighs the same, so long sequences are not diluted."""
    tokens_B = weights_B_T.sum(dim=1)
    return tokens_B, _nonzero(tokens_B)


@register_aggregation("constant")
def _constant(weights_B_T: torch.Tensor, max_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (Liu et al. 2025, §3.1): Σ_i Σ_t ℓ_it / (B · max_tokens) — a fixed normalizer independent of the
    lengths sampled, which removes GRPO's length bias (the paper divides by the generation budget)."""
    if not is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int for aggregation='constant', got {max_tokens!r}")
    ones_B = torch.ones(weights_B_T.shape[0], dtype=weights_B_T.dtype, device=weights_B_T.device)
    return ones_B, ones_B * max_tokens


def _nonzero(tokens_B: torch.Tensor) -> torch.Tensor:
    # An all-masked sequence has numerator 0; dividing by 1 instead of 0 makes its value 0 rather than NaN.
    return torch.where(tokens_B > 0, tokens_B, torch.ones_like(tokens_B))


def aggregation_weights(weights_B_T: torch.Tensor, aggregation: str = "sequence_mean",
                        max_tokens: int | None = None) -> torch.Tensor:
    """Per-sequence weights w_B with policy_loss(batch) = Σ_b w_b · v_b / Σ_b w_b.

    sequence_mean: 1 per sequence; token_mean: its number of trained tokens (Σ_t mask); constant: 1.
    A trainer splitting a minibatch into micro-batches weighs micro-batch k's loss by Σ_{b in k} w_b / Σ_b w_b
    (the engine's per-sample weights) and gets the whole minibatch's loss and gradient exactly.
    """
    weights_B_T = _as_weights(weights_B_T)
    return lookup(AGGREGATIONS, aggregation, "aggregation")(weights_B_T, max_tokens)[0]


# ---------------------------------------------------------------------------------------------------------------
# Policy losses: per-token loss of (log-ratio, advantage), and which tokens each clips
# ---------------------------------------------------------------------------------------------------------------

@register_policy_loss("ppo_clip")
def ppo_clip(log_ratio_B_T: torch.Tensor, advantages_B_1: torch.Tensor, trained_B_T: torch.Tensor, *,
             clip_low: float, clip_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with separate low/high clip (DAPO's clip-higher):
    ℓ = -min(ρ·A, clip(ρ, 1 - clip_low, 1 + clip_high)·A), ρ = exp(log_ratio). TRL's GRPOTrainer with
    `importance_sampling_level="token"` computes the same per-token term (its `loss_type` is our aggregation).
    A token is clipped low when ρ < 1 - clip_low with A < 0, high when ρ > 1 + clip_high with A > 0: the min
    then takes the constant branch and the token gets no gradient."""
    ratio_B_T = torch.exp(log_ratio_B_T)
    clipped_B_T = torch.clamp(ratio_B_T, 1 - clip_low, 1 + clip_high)
    loss_B_T = -torch.minimum(ratio_B_T * advantages_B_1, clipped_B_T * advantages_B_1)
    with torch.no_grad():
        clipped = {"low": (ratio_B_T < 1 - clip_low) & (advantages_B_1 < 0),
                   "high": (ratio_B_T > 1 + clip_high) & (advantages_B_1 > 0)}
    return loss_B_T, clipped


# ---------------------------------------------------------------------------------------------------------------
# The loss of a batch: policy loss + KL, aggregated, with metrics
# ---------------------------------------------------------------------------------------------------------------

def k3_kl(ref_logprobs_B_T: torch.Tensor, logprobs_B_T: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per token, as in GRPO (Shao et al. 2024, eq. 4) and TRL:
    exp(ref - logp) - (ref - logp) - 1. Non-negative, unbiased for samples from π_θ, low variance."""
    return _k3(ref_logprobs_B_T - logprobs_B_T)


def _k3(log_ratio_B_T: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio_B_T) - log_ratio_B_T - 1


def policy_loss(logprobs_B_T: torch.Tensor, old_logprobs_B_T: torch.Tensor, advantages_B: torch.Tensor,
                weights_B_T: torch.Tensor, *, loss: str = "ppo_clip", aggregation: str = "sequence_mean",
                max_tokens: int | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                ref_logprobs_B_T: torch.Tensor | None = None, beta: float = 0.0,
                entropy_B_T: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss `loss` (a name in POLICY_LOSSES) per token, plus beta · k3 KL to the reference, aggregated
    by `aggregation` (a name in AGGREGATIONS): (loss, metrics).

    Per token: ℓ = loss(ρ, A) + beta·k3(ref, logprobs), ρ = exp(logprobs - old). Aggregations: "sequence_mean"
    (GRPO) mean over sequences of Σ_t ℓ·m / Σ_t m; "token_mean" (DAPO) Σ ℓ·m / Σ m; "constant" (Dr. GRPO)
    Σ ℓ·m / (B · max_tokens). `weights_B_T` (m) is 1 on trained (completion) tokens and 0 on prompt and padding;
    fractional values weigh tokens. Gradient flows only through `logprobs_B_T`.

    Metrics are 0-dim tensors (no host sync), token means over the weights: `policy/clip_frac_low`,
    `policy/clip_frac_high` (tokens the loss's clip keeps from the gradient, see the loss), `policy/clip_frac`
    (either), `policy/ratio_mean`, `policy/kl` (k3, when `ref_logprobs_B_T` is given, whatever beta),
    `policy/entropy` (when the caller passes per-token entropies `entropy_B_T`).
    """
    _check_loss_inputs(logprobs_B_T, old_logprobs_B_T, advantages_B, weights_B_T, clip_low, clip_high,
                       ref_logprobs_B_T, beta, entropy_B_T)
    token_loss = lookup(POLICY_LOSSES, loss, "loss")
    aggregate = lookup(AGGREGATIONS, aggregation, "aggregation")
    weights_B_T = _as_weights(weights_B_T).to(logprobs_B_T.dtype)

    # Untrained positions (prompt, padding) may hold anything, -inf included: they are replaced by a log-ratio of 0
    # *before* exp, so that neither the loss (inf * 0) nor the gradient (0 * inf through exp) turns into NaN.
    trained_B_T = weights_B_T != 0
    advantages_B_1 = advantages_B.detach().to(logprobs_B_T.dtype)[:, None]
    log_ratio_B_T = torch.where(trained_B_T, logprobs_B_T - old_logprobs_B_T.detach(), 0.0)
    loss_B_T, clipped = token_loss(log_ratio_B_T, advantages_B_1, trained_B_T, clip_low=clip_low, clip_high=clip_high)
    kl_B_T = None
    if ref_logprobs_B_T is not None:
        kl_B_T = _k3(torch.where(trained_B_T, ref_logprobs_B_T.detach() - logprobs_B_T, 0.0))
        if beta > 0:  # with beta = 0 the KL is only reported; 0 * inf would poison the loss with NaN
            loss_B_T = loss_B_T + beta * kl_B_T

    weight_B, denominator_B = aggregate(weights_B_T, max_tokens)
    value_B = (loss_B_T * weights_B_T).sum(dim=1) / denominator_B  # (B,) the per-sequence value v_b
    total = (weight_B * value_B).sum() / _nonzero(weight_B.sum())

    with torch.no_grad():
        low_B_T, high_B_T = clipped["low"], clipped["high"]
        metrics = {"policy/clip_frac_low": masked_mean(low_B_T, weights_B_T),
                   "policy/clip_frac_high": masked_mean(high_B_T, weights_B_T),
                   "policy/clip_frac": masked_mean(low_B_T | high_B_T, weights_B_T),
                   "policy/ratio_mean": masked_mean(torch.exp(log_ratio_B_T), weights_B_T)}
        if kl_B_T is not None:
            metrics["policy/kl"] = masked_mean(kl_B_T, weights_B_T)
        if entropy_B_T is not None:
            metrics["policy/entropy"] = masked_mean(entropy_B_T, weights_B_T)
    return total, metrics


def masked_mean(values_B_T: torch.Tensor, weights_B_T: torch.Tensor) -> torch.Tensor:
    """Σ values · weights / Σ weights, detached; values where the weight is 0 may be anything (-inf, NaN)."""
    values_B_T = torch.where(weights_B_T != 0, values_B_T.detach().to(weights_B_T.dtype), 0.0)
    return (values_B_T * weights_B_T).sum() / _nonzero(weights_B_T.sum())


def _as_weights(weights_B_T: torch.Tensor) -> torch.Tensor:
    if not isinstance(weights_B_T, torch.Tensor) or weights_B_T.ndim != 2:
        raise ValueError(f"weights_B_T must be a 2-D tensor (B, T), got "
                         f"{getattr(weights_B_T, 'shape', type(weights_B_T))}")
    return weights_B_T if weights_B_T.is_floating_point() else weights_B_T.float()


def _check_loss_inputs(logprobs_B_T, old_logprobs_B_T, advantages_B, weights_B_T, clip_low, clip_high,
                       ref_logprobs_B_T, beta, entropy_B_T) -> None:
    if not isinstance(logprobs_B_T, torch.Tensor) or logprobs_B_T.ndim != 2 or not logprobs_B_T.is_floating_point():
        raise ValueError(f"logprobs_B_T must be a 2-D float tensor (B, T), got "
                         f"{getattr(logprobs_B_T, 'shape', type(logprobs_B_T))}")
    shape = tuple(logprobs_B_T.shape)
    named = {"old_logprobs_B_T": old_logprobs_B_T, "weights_B_T": weights_B_T, "ref_logprobs_B_T": ref_logprobs_B_T,
             "entropy_B_T": entropy_B_T}
    for name, tensor in named.items():
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape):
            raise ValueError(f"{name} must have the shape of logprobs_B_T {shape}, got "
                             f"{getattr(tensor, 'shape', type(tensor))}")
    if not isinstance(advantages_B, torch.Tensor) or tuple(advantages_B.shape) != shape[:1]:
        raise ValueError(f"advantages_B must have shape ({shape[0]},), got "
                         f"{getattr(advantages_B, 'shape', type(advantages_B))}")
    if not (is_real(clip_low) and 0 <= clip_low < 1):
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not (is_real(clip_high) and 0 <= clip_high < math.inf):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high!r}")
    if not (is_real(beta) and 0 <= beta < math.inf):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs_B_T is None:
        raise ValueError(f"beta={beta} needs ref_logprobs_B_T (the reference model's log-probs)")

"""Advantages of grouped rewards, chosen by name: one pure function per normalization (GRPO, batch std, Dr. GRPO).

    advantages_B = group_advantages(rewards_B, group_size=8, normalize="group_std")

Rows are grouped consecutively: with group size G, group g is rows g*G .. g*G+G-1 (the G completions of one
prompt). A new normalization is a function registered with `@register_advantage("name")`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..lm.registry import is_int, lookup, registrar

# TRL's GRPOTrainer adds this to the standard deviation; the same constant makes our advantages comparable.
STD_EPS = 1e-4

ADVANTAGE_NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

register_advantage = registrar(ADVANTAGE_NORMALIZERS, "advantage normalization", """Register `fn(rewards_N_G) ->
advantages_N_G` (N groups of G) under a new name for `group_advantages` (a taken name is refused).
`group_advantages` sets the advantages of groups whose rewards are all equal to exactly 0 afterwards.""")


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
    normalizer = lookup(ADVANTAGE_NORMALIZERS, normalize, "normalize")
    rewards_N_G = _grouped(rewards_B, group_size)
    rewards_N_G = rewards_N_G.to(torch.promote_types(rewards_N_G.dtype, torch.float32))
    advantages_N_G = normalizer(rewards_N_G)
    # A flat group's mean can round away from its rewards (mean of three 0.7s is not 0.7), leaving ~1e-12 after
    # division by std + 1e-4; such groups carry no signal, so their advantages are exactly 0.
    flat_N_1 = (rewards_N_G.amax(dim=1) == rewards_N_G.amin(dim=1))[:, None]
    return advantages_N_G.masked_fill(flat_N_1, 0.0).reshape(-1)


def group_spread(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool per group: do its rewards differ? A group whose rewards all tie has advantage 0 and teaches
    nothing (DAPO's dynamic sampling keeps only groups with a spread)."""
    rewards_N_G = _grouped(rewards_B, group_size)
    return rewards_N_G.amax(dim=1) != rewards_N_G.amin(dim=1)


def zero_std_fraction(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """Fraction (0-dim tensor) of groups whose rewards are all equal: their advantages are 0 and they teach nothing."""
    return (~group_spread(rewards_B, group_size)).float().mean()


def _grouped(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(rewards_B, torch.Tensor):
        rewards_B = torch.as_tensor(rewards_B)
    if rewards_B.ndim != 1 or rewards_B.numel() == 0:
        raise ValueError(f"rewards_B must be a non-empty 1-D tensor, got shape {tuple(rewards_B.shape)}")
    if rewards_B.is_complex() or rewards_B.dtype == torch.bool:
        raise ValueError(f"rewards_B must be real numbers, got dtype {rewards_B.dtype}")
    if not is_int(group_size) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group of one has no baseline), got {group_size!r}")
    if rewards_B.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {rewards_B.numel()} rewards")
    if rewards_B.is_floating_point() and not bool(torch.isfinite(rewards_B).all()):
        raise ValueError("rewards_B contains NaN or infinite values")
    return rewards_B.reshape(-1, group_size)


def overlong_penalty(lengths_N: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to each completion's reward: 0 up to
    `max_new_tokens - buffer` tokens, then falling linearly to `-penalty` at `max_new_tokens`,
    -penalty · (|y| - (max_new_tokens - buffer)) / buffer. (N,) float64 from (N,) completion lengths."""
    if not (is_int(buffer) and is_int(max_new_tokens) and 1 <= buffer <= max_new_tokens):
        raise ValueError(f"buffer must be an int in [1, max_new_tokens={max_new_tokens}], got {buffer!r}")
    over_N = (lengths_N.double() - (max_new_tokens - buffer)).clamp(min=0, max=buffer)
    return -penalty * over_N / buffer


def distillation_advantages(sampler_logprobs_B_T: torch.Tensor, teacher_logprobs_B_T: torch.Tensor,
                            weights_B_T: torch.Tensor, coef: float = 1.0, discount: float = 0.0) -> torch.Tensor:
    """On-policy distillation's per-token advantage (Agarwal et al. 2024; Thinking Machines, "On-Policy
    Distillation", 2025): the negative reverse KL of each sampled token, -λ (log π_sampler(a_t) - log π_teacher(a_t)),
    on the policy's tokens (`weights_B_T` != 0; 0 elsewhere), and with `discount` γ > 0 the discounted sum of the
    future terms, Σ_{k>=t} γ^{k-t} d_k, position by position (an environment's tokens carry no term but count in the
    discount). (B, T) in the logprobs' dtype. The Tinker cookbook's `incorporate_kl_penalty` computes the same.

    Its expectation under the sampler is the reverse KL's gradient direction only because the sampled token is
    scored: a penalty that ignored the sampled token (an expected KL) would have zero expected policy gradient."""
    if not (isinstance(coef, (int, float)) and coef >= 0 and isinstance(discount, (int, float)) and 0 <= discount <= 1):
        raise ValueError(f"coef must be >= 0 and discount in [0, 1], got {coef!r}, {discount!r}")
    trained_B_T = weights_B_T != 0
    terms_B_T = -coef * torch.where(trained_B_T, sampler_logprobs_B_T - teacher_logprobs_B_T, 0.0)
    if not discount:
        return terms_B_T
    sums_B_T, running_B = torch.empty_like(terms_B_T), torch.zeros_like(terms_B_T[:, 0])
    for t in range(terms_B_T.shape[1] - 1, -1, -1):  # one backward pass over the positions
        running_B = terms_B_T[:, t] + discount * running_B
        sums_B_T[:, t] = running_B
    return sums_B_T


def lag_importance_weights(old_logprobs_B_T: torch.Tensor, sampler_logprobs_B_T: torch.Tensor,
                           weights_B_T: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The correction of rollouts sampled by older weights (asynchronous RL; decoupled PPO, Hilton et al. 2022;
    truncated importance sampling, Yao et al. 2025): each token's importance weight π_old(a_t) / π_sampler(a_t),
    the proximal policy π_old being the weights at the update's start (the one the policy loss clips against),
    capped at `cap` (None: not capped). 1 off the policy's tokens (`weights_B_T` == 0). Returns the weights (B, T)
    and which trained tokens were capped (B, T, bool)."""
    if cap is not None and not (isinstance(cap, (int, float)) and cap >= 1):
        raise ValueError(f"cap must be a number >= 1 or None, got {cap!r}")
    trained_B_T = weights_B_T != 0
    weight_B_T = torch.where(trained_B_T, old_logprobs_B_T - sampler_logprobs_B_T, 0.0).exp()
    if cap is None:
        return weight_B_T, torch.zeros_like(trained_B_T)
    return weight_B_T.clamp(max=cap), trained_B_T & (weight_B_T > cap)


def lag_weighted(advantages: torch.Tensor, old_logprobs_B_T: torch.Tensor, sampler_logprobs_B_T: torch.Tensor,
                 weights_B_T: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, dict]:
    """One micro-batch's advantages (B,) or (B, T) for rollouts sampled max_lag steps back: each token's times its
    capped π_old / π_sampler (`lag_importance_weights`), (B, T). Also its metrics (0-dim), means over the trained
    tokens weighted as the loss weighs them: `async/is_weight_mean` and `async/is_capped_frac`."""
    weight_B_T, capped_B_T = lag_importance_weights(old_logprobs_B_T, sampler_logprobs_B_T, weights_B_T, cap)
    total = weights_B_T.sum().clamp_min(1e-12)
    metrics = {"async/is_weight_mean": (weight_B_T * weights_B_T).sum() / total,
               "async/is_capped_frac": (capped_B_T * weights_B_T).sum() / total}
    return (advantages[:, None] if advantages.ndim == 1 else advantages) * weight_B_T, metrics


def add_teacher_term(batch: dict, teacher_logprobs_B_T: torch.Tensor, coef: float, discount: float) -> torch.Tensor:
    """One micro-batch's episode advantages plus on-policy distillation's per-token term
    (`distillation_advantages`), in place: `batch["advantages"]` becomes (B, T). Returns the float64 sums (sampled
    reverse KL, |teacher term|, |episode advantage|, trained tokens) over its trained tokens, for the step's means."""
    weights_B_T, sampler_B_T = batch["weights"], batch["sampling_logprobs"]
    distill_B_T = distillation_advantages(sampler_B_T, teacher_logprobs_B_T, weights_B_T, coef, discount)
    episode_B_1 = batch["advantages"][:, None].to(distill_B_T.dtype)
    batch["advantages"] = episode_B_1 + distill_B_T
    trained_B_T = weights_B_T != 0
    return torch.stack([torch.where(trained_B_T, sampler_B_T - teacher_logprobs_B_T, 0.0).sum(),
                        torch.where(trained_B_T, distill_B_T.abs(), 0.0).sum(),
                        torch.where(trained_B_T, episode_B_1.abs().expand_as(distill_B_T), 0.0).sum(),
                        trained_B_T.sum()]).double()

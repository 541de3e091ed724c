"""Policy losses for language models (GRPO family) and the aggregations that reduce them: pure functions chosen by
name, as verl's `core_algos` does.

    loss, metrics = policy_loss(logprobs_B_T, old_logprobs_B_T, advantages_B, weights_B_T, loss="ppo_clip",
                                aggregation="token_mean", clip_low=0.2, clip_high=0.28)

A policy loss is per token, registered with `@register_policy_loss("name")`: `fn(log_ratio_B_T, advantages_B_1,
weights_B_T, options) -> (loss_B_T, clipped)`, where `options` is a `LossOptions` (clip range, delta, SAPO's
temperatures) and `clipped` maps each side the loss clips ("low", "high", ...) to the (B, T) bool tokens it
clips. `policy_loss` adds the KL penalty and the entropy bonus, aggregates by name and reports metrics, the same
for every loss. A paper's new loss is a new registered function, never a branch in a trainer.

| loss | paper | the per-token term |
|---|---|---|
| `ppo_clip` | PPO; GRPO (Shao et al. 2024); `delta`: INTELLECT-2 (2025) | -min(min(ρ, δ)·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A) |
| `gspo` | GSPO (Zheng et al. 2025) | ppo_clip of the sequence ratio exp(mean_t log ρ_t) |
| `cispo` | MiniMax-M1 (2025) | -sg(min(ρ, 1 + ε_high))·A·log π |
| `sapo` | SAPO (Gao et al. 2025) | -(4/τ)·σ(τ(ρ - 1))·A, τ by the sign of A |

The published recipes, as options:

| recipe | advantage | aggregation | loss |
|---|---|---|---|
| GRPO (Shao et al. 2024, DeepSeekMath) | `group_std` | `sequence_mean` | `ppo_clip`, clip_low = clip_high = 0.2 |
| DAPO (Yu et al. 2025) | `group_std` | `token_mean` | `ppo_clip` with clip-higher: clip_high (0.28) > clip_low (0.2) |
| Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") | `none` | `constant` | `ppo_clip` as GRPO |
| GSPO (Zheng et al. 2025) | `group_std` | `sequence_mean` | `gspo`, clip 3e-4 / 4e-4 |
| CISPO (MiniMax-M1) | `group_std` | `token_mean` | `cispo` |

Accumulation. Every aggregation is a weighted mean of one value per sequence:

    policy_loss = Σ_b w_b · v_b / Σ_b w_b,   w_B = aggregation_weights(weights_B_T, aggregation, max_tokens)

so a trainer that splits a minibatch into micro-batches k reproduces the whole minibatch's loss and gradient
exactly by giving micro-batch k the share W_k / W of the update (W_k = Σ of its w_b): this is the engine's
weighted step, with w_b as each sample's weight. Every loss here keeps that: GSPO's ratio is a sequence's own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..lm.registry import is_int, is_real, lookup, registrar

AGGREGATIONS: dict[str, Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}

register_aggregation = registrar(AGGREGATIONS, "aggregation", """Register `fn(weights_B_T, max_tokens) ->
(weight_B, denominator_B)` under a new name for `policy_loss` (a taken name is refused). The loss is
Σ_b weight_b · (Σ_t ℓ_bt m_bt / denominator_b) / Σ_b weight_b; see the module docstring.""")

_register_policy_loss = registrar(POLICY_LOSSES, "policy loss", "")


def register_policy_loss(name: str, *, reads: tuple[str, ...] = (), one_per_sequence: bool = False):
    """Register `fn(log_ratio_B_T, advantages_B_1, weights_B_T, options) -> (loss_B_T, clipped)` under a new name
    for `policy_loss` (a taken name is refused). `log_ratio_B_T` is logπ - logπ_old, with gradient through logπ and
    0 at untrained positions; `weights_B_T` the float token weights (0 off the completion); `options` a
    `LossOptions`; `clipped` maps each side the loss clips (e.g. "low", "high") to the (B, T) bool tokens it clips,
    reported as `policy/clip_frac_<side>`.

    What the loss is, declared here and nowhere else: `reads`, the `LossOptions` fields it uses (RLConfig refuses a
    setting changed from its default that the chosen loss does not read: it would be ignored in silence; a new
    setting is a new `LossOptions` field and RLConfig key of the same name), and `one_per_sequence`, whether every
    token of a sequence shares one loss value (GSPO: masking tokens by entropy would then only reweight sequences)."""
    unknown = set(reads) - {f.name for f in dataclasses.fields(LossOptions)}
    if unknown:
        raise ValueError(f"policy loss {name!r}: reads {sorted(unknown)}, which are not LossOptions fields "
                         f"({[f.name for f in dataclasses.fields(LossOptions)]})")

    def add(fn: Callable) -> Callable:
        _register_policy_loss(name)(fn)
        POLICY_LOSS_TRAITS[name] = LossTraits(tuple(reads), one_per_sequence)
        return fn
    return add


@dataclass(frozen=True)
class LossTraits:
    """What a registered policy loss declares about itself (see `register_policy_loss`)."""

    reads: tuple[str, ...]
    one_per_sequence: bool


POLICY_LOSS_TRAITS: dict[str, LossTraits] = {}


def loss_traits(name: str) -> LossTraits:
    """The traits of the registered policy loss `name` (a function put in POLICY_LOSSES by hand declares none)."""
    lookup(POLICY_LOSSES, name, "policy loss")
    return POLICY_LOSS_TRAITS.get(name, LossTraits((), False))


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


def update_shares(minibatches: list[list[dict]], aggregation: str, max_tokens: int | None, reduce_sum: Callable,
                  entropy: bool = False) -> list[list[float]]:
    """Each micro-batch's part of its update's normalizer over every process: the sum of its `aggregation_weights`
    (1 per sequence, or its trained tokens for token_mean) over the update's, all-reduced once for the whole step by
    `reduce_sum`. With `entropy` (a bonus), each micro-batch also gets its `entropy_normalizer`: the update's
    trained tokens times the micro-batch's share, so that the bonus is the update's mean entropy per token."""
    weights_M_K = [torch.stack([aggregation_weights(b["weights"].double(), aggregation, max_tokens).sum()
                                for b in micro_batches]) for micro_batches in minibatches]
    local_tokens_M = torch.stack([sum(b["weights"].double().sum() for b in micro_batches)
                                  for micro_batches in minibatches])
    totals_M, tokens_M = reduce_sum(torch.stack([torch.stack([w_K.sum() for w_K in weights_M_K]),
                                                 local_tokens_M]))  # every process's, one all-reduce
    shares = [(w_K / total.clamp_min(1e-12)).tolist() for w_K, total in zip(weights_M_K, totals_M)]
    if entropy:
        for micro_batches, micro_shares, tokens in zip(minibatches, shares, tokens_M.tolist()):
            for batch, share in zip(micro_batches, micro_shares):
                batch["entropy_normalizer"] = share * tokens
    return shares


# ---------------------------------------------------------------------------------------------------------------
# Policy losses: per-token loss of (log-ratio, advantage), and which tokens each clips
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossOptions:
    """The settings of the registered policy losses (each reads the ones it uses), checked when built."""

    clip_low: float = 0.2  # ppo_clip, gspo: ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # ppo_clip, gspo; cispo: the importance weight is capped at 1 + clip_high
    delta: float | None = None  # ppo_clip: the unclipped ratio capped at delta (INTELLECT-2's two-sided clip)
    sapo_tau_pos: float = 1.0  # sapo: the gate's temperature for positive advantages
    sapo_tau_neg: float = 1.05  # sapo: for negative advantages (steeper: negative updates are riskier)

    def __post_init__(self):
        if not (is_real(self.clip_low) and 0 <= self.clip_low < 1):
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low!r}")
        if not (is_real(self.clip_high) and 0 <= self.clip_high < math.inf):
            raise ValueError(f"clip_high must be a finite number >= 0, got {self.clip_high!r}")
        if self.delta is not None and not (is_real(self.delta) and 1 + self.clip_high < self.delta < math.inf):
            raise ValueError(f"delta must be a finite number > 1 + clip_high = {1 + self.clip_high:g} (below it, it "
                             f"would cap ratios the clip lets through), or None; got {self.delta!r}")
        for key in ("sapo_tau_pos", "sapo_tau_neg"):
            if not (is_real(getattr(self, key)) and 0 < getattr(self, key) < math.inf):
                raise ValueError(f"{key} must be a finite number > 0, got {getattr(self, key)!r}")


@register_policy_loss("ppo_clip", reads=("clip_low", "clip_high", "delta"))
def ppo_clip(log_ratio_B_T: torch.Tensor, advantages_B_1: torch.Tensor, weights_B_T: torch.Tensor,
             options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with separate low/high clip (DAPO's clip-higher):
    ℓ = -min(ρ·A, clip(ρ, 1 - clip_low, 1 + clip_high)·A), ρ = exp(log_ratio).

    A token is clipped "low" when ρ < 1 - clip_low with A < 0, "high" when ρ > 1 + clip_high with A > 0: the min
    then takes the constant branch and the token gets no gradient. With A < 0 a token whose ratio runs away
    (ρ ≫ 1) is not clipped, and its loss -ρ·A grows without bound; `delta` (INTELLECT-2, 2025, §3.2 two-sided
    clipping; dual-clip PPO, Ye et al. 2020) caps that ratio: ℓ = -min(min(ρ, δ)·A, clip(ρ)·A), and tokens with
    ρ > δ and A < 0 are clipped "delta".

    TRL: `importance_sampling_level="token"` with `epsilon`, `epsilon_high`, `delta` computes the same per-token
    term; its `loss_type` ("grpo", "dapo", "dr_grpo") is our aggregation."""
    c = options
    ratio_B_T = torch.exp(log_ratio_B_T)
    clipped_B_T = torch.clamp(ratio_B_T, 1 - c.clip_low, 1 + c.clip_high)
    unclipped_B_T = ratio_B_T if c.delta is None else torch.clamp(ratio_B_T, max=c.delta)
    loss_B_T = -torch.minimum(unclipped_B_T * advantages_B_1, clipped_B_T * advantages_B_1)
    with torch.no_grad():
        clipped = {"low": (ratio_B_T < 1 - c.clip_low) & (advantages_B_1 < 0),
                   "high": (ratio_B_T > 1 + c.clip_high) & (advantages_B_1 > 0)}
        if c.delta is not None:
            clipped["delta"] = (ratio_B_T > c.delta) & (advantages_B_1 < 0)
    return loss_B_T, clipped


@register_policy_loss("gspo", reads=("clip_low", "clip_high"), one_per_sequence=True)
def gspo(log_ratio_B_T: torch.Tensor, advantages_B_1: torch.Tensor, weights_B_T: torch.Tensor,
         options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7): one importance ratio per sequence,
    s_i = exp((1/|o_i|) Σ_t (logπ - logπ_old)), the geometric mean of its token ratios, clipped as PPO's:
    ℓ_i = -min(s_i·A_i, clip(s_i, 1 - clip_low, 1 + clip_high)·A_i), the same value at each of the sequence's
    tokens. Whole sequences are clipped together, so a clip fraction counts their tokens.

    The paper's aggregation is the sequence mean (`aggregation="sequence_mean"`), where the loss is exactly
    (1/G) Σ_i ℓ_i; any aggregation works (token_mean weighs sequence i by |o_i|). The paper's clip range is
    narrow (3e-4 / 4e-4) because a sequence ratio moves far less than a token's. |o_i| is the sequence's weight
    Σ_t m_t (its trained tokens). TRL: `importance_sampling_level="sequence"` computes the same ratio and term."""
    tokens_B_1 = weights_B_T.sum(dim=1, keepdim=True)
    sequence_log_ratio_B_1 = (log_ratio_B_T * weights_B_T).sum(dim=1, keepdim=True) / _nonzero(tokens_B_1)
    return ppo_clip(sequence_log_ratio_B_1.expand_as(log_ratio_B_T), advantages_B_1, weights_B_T,
                    dataclasses.replace(options, delta=None))


@register_policy_loss("cispo", reads=("clip_high",))
def cispo(log_ratio_B_T: torch.Tensor, advantages_B_1: torch.Tensor, weights_B_T: torch.Tensor,
          options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, 2025, eq. 4-5): clip the importance weight, not the update. ℓ = -sg(min(ρ, 1 +
    clip_high))·A·log π_θ: the weight is capped from above and detached, and every token keeps the gradient
    -sg(w)·A·∇log π, however far its ratio has run (PPO's clip would drop it; those are often the rare "fork"
    tokens a long reasoning chain hinges on). A token is clipped "high" when ρ > 1 + clip_high: its weight is
    capped, its gradient kept.

    The value here is -sg(w)·A·(log π - log π_old), with the same gradient as TRL's -sg(w)·A·log π (they differ
    by a constant). TRL's `loss_type="cispo"` caps the weight at `epsilon_high` itself (its default 5.0); ours at
    1 + clip_high, the convention of the other losses (clip_high = 4 is TRL's default)."""
    ratio_B_T = torch.exp(log_ratio_B_T)
    weight_B_T = torch.clamp(ratio_B_T, max=1 + options.clip_high).detach()
    loss_B_T = -weight_B_T * advantages_B_1 * log_ratio_B_T
    with torch.no_grad():
        high_B_T = ratio_B_T > 1 + options.clip_high
    return loss_B_T, {"low": torch.zeros_like(high_B_T), "high": high_B_T}


@register_policy_loss("sapo", reads=("sapo_tau_pos", "sapo_tau_neg"))
def sapo(log_ratio_B_T: torch.Tensor, advantages_B_1: torch.Tensor, weights_B_T: torch.Tensor,
         options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", eq. 5-6): a smooth gate in place of the hard
    clip, ℓ = -f(ρ)·A with f(ρ) = (4/τ)·σ(τ(ρ - 1)), τ = sapo_tau_pos for A > 0 and sapo_tau_neg for A < 0.

    At ρ = 1 the gate's slope f'(1) = 1, so on-policy its gradient is the plain policy gradient; off-policy the
    token's gradient -A·ρ·f'(ρ) = -A·ρ·4σ(1 - σ) fades smoothly instead of dropping to 0. Nothing is cut, so
    "low" and "high" count the tokens whose gradient the gate has faded below half of the unclipped
    objective's (4σ(1 - σ) < 1/2: |ρ - 1| > 1.76/τ), on the side of the ratio. TRL's `loss_type="sapo"` with
    `sapo_temperature_pos`/`_neg` computes the same term."""
    ratio_B_T = torch.exp(log_ratio_B_T)
    # in the advantages' dtype (float64 stays float64: torch.where of two python floats would round them to float32)
    tau_B_1 = torch.full_like(advantages_B_1, options.sapo_tau_neg).masked_fill(advantages_B_1 > 0, options.sapo_tau_pos)
    gate_B_T = torch.sigmoid(tau_B_1 * (ratio_B_T - 1))
    loss_B_T = -(4 / tau_B_1) * gate_B_T * advantages_B_1
    with torch.no_grad():
        faded_B_T = 4 * gate_B_T * (1 - gate_B_T) < 0.5
    return loss_B_T, {"low": faded_B_T & (ratio_B_T < 1), "high": faded_B_T & (ratio_B_T > 1)}


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
                max_tokens: int | None = None, ref_logprobs_B_T: torch.Tensor | None = None, beta: float = 0.0,
                entropy_B_T: torch.Tensor | None = None, entropy_coef: float = 0.0,
                entropy_normalizer: torch.Tensor | float | None = None,
                policy_mask_B_T: torch.Tensor | None = None, **settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss `loss` (a name in POLICY_LOSSES) per token, plus beta · k3 KL to the reference, aggregated
    by `aggregation` (a name in AGGREGATIONS), minus an entropy bonus: (loss, metrics).

    Per token: ℓ = loss(ρ, A)·g + beta·k3(ref, logprobs), ρ = exp(logprobs - old), g = `policy_mask_B_T` (1 where
    unset). Aggregations: "sequence_mean" (GRPO) mean over sequences of Σ_t ℓ·m / Σ_t m; "token_mean" (DAPO)
    Σ ℓ·m / Σ m; "constant" (Dr. GRPO) Σ ℓ·m / (B · max_tokens). `weights_B_T` (m) is 1 on trained (completion)
    tokens and 0 on prompt and padding; fractional values weigh tokens. Gradient flows only through
    `logprobs_B_T` (and `entropy_B_T`, when it has one). `settings` are the losses' settings by name, the fields of
    `LossOptions` (`clip_low`, `clip_high`, `delta`, `sapo_tau_pos`, `sapo_tau_neg`); unset ones take its defaults.

    `policy_mask_B_T` (bool): the tokens that carry the policy gradient ("Beyond the 80/20 rule", Wang et al.
    2025, eq. 5: the top-entropy tokens); the others keep their KL term and still count in the normalizer, as in
    the paper's formula. `entropy_coef` > 0 subtracts entropy_coef · Σ H·m / `entropy_normalizer`: the mean
    entropy per trained token (default normalizer: this batch's Σ m; a trainer that splits an update into
    micro-batches passes the update's total times the micro-batch's share, so the bonus is the update's token
    mean whatever the aggregation). `entropy_B_T` must then carry a gradient.

    Metrics are 0-dim tensors (no host sync), token means over the weights: `policy/clip_frac_<side>` for each
    side the loss clips ("low", "high"; "delta" with a delta; see the loss), `policy/clip_frac` (any side),
    `policy/ratio_mean` (of the token ratios), `policy/kl` (k3, when `ref_logprobs_B_T` is given, whatever beta),
    `policy/entropy` (when `entropy_B_T` is given), `policy/pg_token_frac` (with a policy mask).
    """
    options = _check_loss_inputs(logprobs_B_T, old_logprobs_B_T, advantages_B, weights_B_T, ref_logprobs_B_T, beta,
                                 entropy_B_T, entropy_coef, policy_mask_B_T, **settings)
    token_loss = lookup(POLICY_LOSSES, loss, "loss")
    aggregate = lookup(AGGREGATIONS, aggregation, "aggregation")
    weights_B_T = _as_weights(weights_B_T).to(logprobs_B_T.dtype)

    # Untrained positions (prompt, padding) may hold anything, -inf included: they are replaced by a log-ratio of 0
    # *before* exp, so that neither the loss (inf * 0) nor the gradient (0 * inf through exp) turns into NaN.
    trained_B_T = weights_B_T != 0
    # one advantage per sequence (B,), broadcast over its tokens, or one per token (B, T) (on-policy distillation)
    advantages_B_1 = advantages_B.detach().to(logprobs_B_T.dtype)
    advantages_B_1 = advantages_B_1[:, None] if advantages_B_1.ndim == 1 else advantages_B_1
    log_ratio_B_T = torch.where(trained_B_T, logprobs_B_T - old_logprobs_B_T.detach(), 0.0)
    loss_B_T, clipped = token_loss(log_ratio_B_T, advantages_B_1, weights_B_T, options)
    if policy_mask_B_T is not None:
        loss_B_T = loss_B_T * policy_mask_B_T
    kl_B_T = None
    if ref_logprobs_B_T is not None:
        kl_B_T = _k3(torch.where(trained_B_T, ref_logprobs_B_T.detach() - logprobs_B_T, 0.0))
        if beta > 0:  # with beta = 0 the KL is only reported; 0 * inf would poison the loss with NaN
            loss_B_T = loss_B_T + beta * kl_B_T

    weight_B, denominator_B = aggregate(weights_B_T, max_tokens)
    value_B = (loss_B_T * weights_B_T).sum(dim=1) / denominator_B  # (B,) the per-sequence value v_b
    total = (weight_B * value_B).sum() / _nonzero(weight_B.sum())
    if entropy_coef > 0:
        entropy_sum = (torch.where(trained_B_T, entropy_B_T, 0.0) * weights_B_T).sum()
        normalizer = weights_B_T.sum() if entropy_normalizer is None else torch.as_tensor(entropy_normalizer)
        total = total - entropy_coef * entropy_sum / _nonzero(normalizer.to(entropy_sum))

    return total, _loss_metrics(weights_B_T, clipped, log_ratio_B_T, kl_B_T, entropy_B_T, policy_mask_B_T)


@torch.no_grad()
def _loss_metrics(weights_B_T, clipped, log_ratio_B_T, kl_B_T, entropy_B_T, policy_mask_B_T) -> dict:
    """`policy_loss`'s metrics, token means over the weights (see there)."""
    mean = masked_means(weights_B_T)  # the mask and the normalizer once for every metric
    anything_B_T = torch.zeros_like(weights_B_T, dtype=torch.bool)
    metrics = {}
    for side, clipped_B_T in clipped.items():
        metrics[f"policy/clip_frac_{side}"] = mean(clipped_B_T)
        anything_B_T = anything_B_T | clipped_B_T
    metrics["policy/clip_frac"] = mean(anything_B_T)
    metrics["policy/ratio_mean"] = mean(torch.exp(log_ratio_B_T))
    if kl_B_T is not None:
        metrics["policy/kl"] = mean(kl_B_T)
    if entropy_B_T is not None:
        metrics["policy/entropy"] = mean(entropy_B_T)
    if policy_mask_B_T is not None:
        metrics["policy/pg_token_frac"] = mean(policy_mask_B_T)
    return metrics


def masked_mean(values_B_T: torch.Tensor, weights_B_T: torch.Tensor) -> torch.Tensor:
    """Σ values · weights / Σ weights, detached; values where the weight is 0 may be anything (-inf, NaN)."""
    return masked_means(weights_B_T)(values_B_T)


def masked_means(weights_B_T: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`masked_mean(·, weights_B_T)` as a function of the values, its mask and normalizer computed once: the same
    numbers, for the several metrics a loss takes over one batch's weights."""
    trained_B_T, total = weights_B_T != 0, _nonzero(weights_B_T.sum())

    def mean(values_B_T: torch.Tensor) -> torch.Tensor:
        values_B_T = torch.where(trained_B_T, values_B_T.detach().to(weights_B_T.dtype), 0.0)
        return (values_B_T * weights_B_T).sum() / total
    return mean


def _as_weights(weights_B_T: torch.Tensor) -> torch.Tensor:
    if not isinstance(weights_B_T, torch.Tensor) or weights_B_T.ndim != 2:
        raise ValueError(f"weights_B_T must be a 2-D tensor (B, T), got "
                         f"{getattr(weights_B_T, 'shape', type(weights_B_T))}")
    return weights_B_T if weights_B_T.is_floating_point() else weights_B_T.float()


def _check_loss_inputs(logprobs_B_T, old_logprobs_B_T, advantages_B, weights_B_T, ref_logprobs_B_T, beta,
                       entropy_B_T, entropy_coef, policy_mask_B_T, **options) -> LossOptions:
    if not isinstance(logprobs_B_T, torch.Tensor) or logprobs_B_T.ndim != 2 or not logprobs_B_T.is_floating_point():
        raise ValueError(f"logprobs_B_T must be a 2-D float tensor (B, T), got "
                         f"{getattr(logprobs_B_T, 'shape', type(logprobs_B_T))}")
    shape = tuple(logprobs_B_T.shape)
    named = {"old_logprobs_B_T": old_logprobs_B_T, "weights_B_T": weights_B_T, "ref_logprobs_B_T": ref_logprobs_B_T,
             "entropy_B_T": entropy_B_T, "policy_mask_B_T": policy_mask_B_T}
    for name, tensor in named.items():
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape):
            raise ValueError(f"{name} must have the shape of logprobs_B_T {shape}, got "
                             f"{getattr(tensor, 'shape', type(tensor))}")
    if not isinstance(advantages_B, torch.Tensor) or tuple(advantages_B.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages_B must have shape ({shape[0]},) or that of logprobs_B_T {shape}, got "
                         f"{getattr(advantages_B, 'shape', type(advantages_B))}")
    if policy_mask_B_T is not None and policy_mask_B_T.dtype != torch.bool:
        raise ValueError(f"policy_mask_B_T must be a bool tensor, got dtype {policy_mask_B_T.dtype}")
    options = LossOptions(**options)
    if not (is_real(beta) and 0 <= beta < math.inf):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta > 0 and ref_logprobs_B_T is None:
        raise ValueError(f"beta={beta} needs ref_logprobs_B_T (the reference model's log-probs)")
    if not (is_real(entropy_coef) and 0 <= entropy_coef < math.inf):
        raise ValueError(f"entropy_coef must be a finite number >= 0, got {entropy_coef!r}")
    if entropy_coef > 0 and (entropy_B_T is None or torch.is_grad_enabled() and not entropy_B_T.requires_grad):
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy_B_T with a gradient (the bonus trains it)")
    return options


def linear_quantile(values_n: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile(values_n, q)` (linear interpolation) by a sort: torch.quantile refuses inputs of more than
    2^24 elements, which an update over long transcripts reaches (the top-entropy mask's threshold)."""
    sorted_n = values_n.sort().values
    position = q * (len(sorted_n) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(sorted_n) - 1)
    return sorted_n[low] + (sorted_n[high] - sorted_n[low]) * (position - low)

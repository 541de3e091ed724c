"""Preference losses (the DPO family): pure functions of per-pair summed log-probs, registered and chosen by name.

    loss, metrics = preference_loss(pairs, losses=("sigmoid",), beta=0.1)       # DPO
    loss, metrics = preference_loss(pairs, losses=("sigmoid", "sft"), weights=(1.0, 1.0))   # RPO: DPO + NLL

`pairs` is a `PairLogps`: for each of P pairs, the policy's summed log-prob of the chosen and of the rejected
completion, the reference's (None for a reference-free loss), and the completions' lengths in tokens. A loss is
registered with `@register_preference_loss("name", reads=(...), needs_reference=...)`: `fn(pairs, options) ->
(P,)`, the loss of each pair; `preference_loss` takes the weighted sum of several losses' pair means, as TRL's
`loss_type` list with `loss_weights` does. A paper's new variant is a new registered name, never a branch in a
trainer.

| loss | paper | per pair, with Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)) |
|---|---|---|
| `sigmoid` | DPO (Rafailov et al. 2023, eq. 7); cDPO with `label_smoothing` ε | -(1-ε) log σ(βΔ) - ε log σ(-βΔ) |
| `robust` | Robust DPO (Chowdhury et al. 2024, eq. 11) | (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε) |
| `hinge` | SLiC-HF (Zhao et al. 2023) | max(0, 1 - βΔ) |
| `ipo` | IPO (Azar et al. 2023, eq. 17) | (Δ' - 1/(2β))², Δ' with each log-ratio averaged over its tokens (TRL) or summed |
| `simpo` | SimPO (Meng et al. 2024, eq. 6), no reference | -log σ(β (log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ) |
| `sft` | RPO's NLL term (Pang et al. 2024) | the chosen completion's NLL, a mean over every chosen token of the step |

Every loss is a mean over the step's pairs, and a micro-batch's share of the step is its share of the pairs (the
engine's weighted step, each pair weighing 1), so the loss and gradient do not depend on how a step is split into
micro-batches and processes. `sft` is a token mean: its pair value is the pair's chosen NLL times (the step's
pairs) / (the step's chosen tokens), so that its pair mean is the step's token mean — a trainer that splits a step
passes those two counts (`PairLogps.step_pairs`, `step_chosen_tokens`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..lm.registry import registrar

PREFERENCE_LOSSES: dict[str, Callable] = {}
_register = registrar(PREFERENCE_LOSSES, "preference loss", "")


@dataclass(frozen=True)
class LossTraits:
    """What a registered preference loss declares: the `PreferenceOptions` it reads, and whether it needs the
    reference's log-probs."""

    reads: tuple[str, ...]
    needs_reference: bool


PREFERENCE_LOSS_TRAITS: dict[str, LossTraits] = {}


@dataclass(frozen=True)
class PreferenceOptions:
    """The preference losses' settings (each loss reads the ones it declares), checked when built."""

    beta: float = 0.1  # the inverse temperature of the implicit reward β log π/π_ref (IPO: its τ)
    label_smoothing: float = 0.0  # cDPO / robust: the assumed rate of flipped labels, in [0, 0.5)
    ipo_normalize_length: bool = True  # IPO: each log-ratio averaged over its tokens (TRL) or summed (OpenRLHF)
    simpo_gamma: float = 0.5  # SimPO: the target reward margin γ

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and 0 < self.beta < math.inf):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if not (isinstance(self.simpo_gamma, (int, float)) and math.isfinite(self.simpo_gamma)):
            raise ValueError(f"simpo_gamma must be a finite number, got {self.simpo_gamma!r}")


def register_preference_loss(name: str, *, reads: tuple[str, ...] = (), needs_reference: bool = True):
    """Register `fn(pairs: PairLogps, options: PreferenceOptions) -> loss_P` under a new name (a taken name is
    refused). `reads`: the `PreferenceOptions` fields it uses (a config refuses a changed setting no chosen loss
    reads); `needs_reference`: whether it reads the reference's log-probs (a run whose losses need none builds no
    reference model)."""
    unknown = set(reads) - {f.name for f in dataclasses.fields(PreferenceOptions)}
    if unknown:
        raise ValueError(f"preference loss {name!r}: reads {sorted(unknown)}, which are not PreferenceOptions fields")

    def add(fn: Callable) -> Callable:
        _register(name)(fn)
        PREFERENCE_LOSS_TRAITS[name] = LossTraits(tuple(reads), needs_reference)
        return fn
    return add


def loss_traits(name: str) -> LossTraits:
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; choose one of {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSS_TRAITS.get(name, LossTraits((), True))


@dataclass(frozen=True)
class PairLogps:
    """P pairs' summed log-probs (policy, and the reference's or None) and completion lengths in tokens, (P,) each.
    `step_pairs`, `step_chosen_tokens`: the pairs and chosen tokens of the whole step these pairs are part of
    (every micro-batch and process), for `sft`'s token mean; None: these pairs are the step."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    step_pairs: float | None = None
    step_chosen_tokens: float | None = None

    def delta(self) -> torch.Tensor:
        """Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)), (P,)."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)


def _smoothed_sigmoid(logits_P: torch.Tensor, epsilon: float) -> torch.Tensor:
    return -(1 - epsilon) * F.logsigmoid(logits_P) - epsilon * F.logsigmoid(-logits_P)


@register_preference_loss("sigmoid", reads=("beta", "label_smoothing"))
def sigmoid(pairs: PairLogps, options: PreferenceOptions) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(βΔ); with `label_smoothing` ε, cDPO's conservative
    -(1-ε) log σ(βΔ) - ε log σ(-βΔ). TRL's `loss_type="sigmoid"` (ε = 0)."""
    return _smoothed_sigmoid(options.beta * pairs.delta(), options.label_smoothing)


@register_preference_loss("robust", reads=("beta", "label_smoothing"))
def robust(pairs: PairLogps, options: PreferenceOptions) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 11): an unbiased loss under labels flipped at rate ε,
    (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε). TRL's `loss_type="robust"`."""
    beta_delta, epsilon = options.beta * pairs.delta(), options.label_smoothing
    return (-(1 - epsilon) * F.logsigmoid(beta_delta) + epsilon * F.logsigmoid(-beta_delta)) / (1 - 2 * epsilon)


@register_preference_loss("hinge", reads=("beta",))
def hinge(pairs: PairLogps, options: PreferenceOptions) -> torch.Tensor:
    """SLiC-HF's calibration loss (Zhao et al. 2023) on DPO's log-ratios: max(0, 1 - βΔ). TRL's `"hinge"`."""
    return torch.relu(1 - options.beta * pairs.delta())


@register_preference_loss("ipo", reads=("beta", "ipo_normalize_length"))
def ipo(pairs: PairLogps, options: PreferenceOptions) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17), β as its τ: (Δ' - 1/(2β))². With `ipo_normalize_length` (TRL, who checked
    it with the authors) each completion's log-ratio is its mean over its tokens; without (OpenRLHF), its sum."""
    chosen, rejected = pairs.chosen - pairs.ref_chosen, pairs.rejected - pairs.ref_rejected
    if options.ipo_normalize_length:
        chosen = chosen / pairs.chosen_lengths.clamp_min(1)
        rejected = rejected / pairs.rejected_lengths.clamp_min(1)
    return (chosen - rejected - 1 / (2 * options.beta)) ** 2


@register_preference_loss("simpo", reads=("beta", "simpo_gamma", "label_smoothing"), needs_reference=False)
def simpo(pairs: PairLogps, options: PreferenceOptions) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), no reference: the length-normalized log-probs' margin against γ,
    -log σ(β (log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ) (label smoothing as cDPO's). TRL: CPOTrainer's
    `loss_type="simpo"`, whose logits are that margin less γ/β."""
    margin = pairs.chosen / pairs.chosen_lengths.clamp_min(1) - pairs.rejected / pairs.rejected_lengths.clamp_min(1)
    return _smoothed_sigmoid(options.beta * margin - options.simpo_gamma, options.label_smoothing)


@register_preference_loss("sft", needs_reference=False)
def sft(pairs: PairLogps, options: PreferenceOptions) -> torch.Tensor:
    """The chosen completions' NLL per token over the whole step (RPO's NLL term, Pang et al. 2024; TRL's
    `loss_type="sft"`): each pair's chosen NLL sum, scaled so that the mean over the step's pairs is the mean over
    its chosen tokens."""
    step_pairs = len(pairs.chosen) if pairs.step_pairs is None else pairs.step_pairs
    tokens = float(pairs.chosen_lengths.sum()) if pairs.step_chosen_tokens is None else pairs.step_chosen_tokens
    return -pairs.chosen * (step_pairs / max(tokens, 1.0))


def preference_loss(pairs: PairLogps, losses: tuple[str, ...] = ("sigmoid",), weights: tuple[float, ...] | None = None,
                    **settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k weight_k · mean over pairs of `losses[k]` (weights default 1 each): (loss, metrics). `settings`: the
    `PreferenceOptions` fields. Metrics (TRL's names; the implicit reward r = β log π/π_ref; detached means over
    the pairs): `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (r_w > r_l), `rewards/margins` (with a
    reference), and `logps/chosen`, `logps/rejected` (the policy's summed log-probs)."""
    options = PreferenceOptions(**settings)
    weights = (1.0,) * len(losses) if weights is None else tuple(weights)
    if not losses or len(weights) != len(losses):
        raise ValueError(f"losses and weights: one weight per loss, got {losses!r} and {weights!r}")
    total = sum(weight * lookup(name)(pairs, options).mean() for name, weight in zip(losses, weights))
    return total, pair_metrics(pairs, options.beta)


def lookup(name: str) -> Callable:
    loss_traits(name)
    return PREFERENCE_LOSSES[name]


@torch.no_grad()
def pair_metrics(pairs: PairLogps, beta: float) -> dict[str, torch.Tensor]:
    metrics = {"logps/chosen": pairs.chosen.detach().mean(), "logps/rejected": pairs.rejected.detach().mean()}
    if pairs.ref_chosen is not None:
        chosen_P = beta * (pairs.chosen - pairs.ref_chosen).detach()
        rejected_P = beta * (pairs.rejected - pairs.ref_rejected).detach()
        metrics.update({"rewards/chosen": chosen_P.mean(), "rewards/rejected": rejected_P.mean(),
                        "rewards/accuracies": (chosen_P > rejected_P).to(chosen_P.dtype).mean(),
                        "rewards/margins": (chosen_P - rejected_P).mean()})
    return metrics

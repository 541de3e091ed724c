"""Model utilities a language-model trainer needs around its policy: dropout switched off, a frozen copy (a
reference model, a teacher), and a cheap fingerprint of weights (to check on resume that a rebuilt model is the
one a run started from)."""

from __future__ import annotations

import copy

import torch


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer (nn.Dropout modules, and transformers attention's `attention_dropout` rate):
    completions are sampled in eval mode, so a training forward with dropout would score other log-probs than
    the sampler's, and the PPO ratio would not be 1 before any update."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` in eval mode, with no parameter requiring grad."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def weight_checksum(tensors) -> torch.Tensor:
    """A float64 fingerprint of weights (position-weighted sum of per-tensor sums), cheap to compare."""
    sums_K = torch.stack([t.detach().double().sum().cpu() for t in tensors])
    return (sums_K * torch.arange(1, len(sums_K) + 1, dtype=torch.float64)).sum()


def frozen_reference(model: torch.nn.Module, lora: bool) -> tuple[torch.nn.Module | None, torch.Tensor]:
    """The initial policy, to score against (a KL's reference): a frozen copy of `model`, or with LoRA None — the
    base itself is the reference, its adapters switched off, no copy made; and the checksum of the reference's
    weights, which a resumed run compares (`check_reference`): the reference is rebuilt, not checkpointed."""
    reference = None if lora else frozen_copy(model)
    frozen = reference.parameters() if reference is not None else (p for p in model.parameters() if not p.requires_grad)
    return reference, weight_checksum(frozen)


def check_reference(saved: torch.Tensor | None, mine: torch.Tensor | None, owner: str,
                    what: str = "reference model") -> None:
    """A checkpoint's checksum of a frozen model (the reference, a teacher) against this run's: another one is an
    error — for the reference, another initial model (it is rebuilt from the model given to the trainer)."""
    if saved is None or mine is None or torch.allclose(saved.to(mine), mine, rtol=1e-9, atol=0):
        return
    if what == "reference model":
        raise ValueError(f"reference model: this run's initial model is not the one the checkpointed run started "
                         f"from (the frozen reference is rebuilt from the model given to {owner}); build the "
                         "trainer with the same initial model, not with trained weights")
    raise ValueError(f"{what}: this run's {what} is not the one the checkpointed run used (its weights' checksum "
                     f"differs); resume with the same {what}")

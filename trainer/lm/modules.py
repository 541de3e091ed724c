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

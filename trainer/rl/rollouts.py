"""Rollouts and the training batch built from them: pure, except the data plan that feeds them.

    rollouts = trainer.rollout(indices)                  # G completions of each prompt, decoded and scored
    batch = rollouts.batch(advantages_N)                 # the shared LM batch shape, plus advantages and
    micro_batches = split_rows(batch, rows=8)            #   the sampler's log-probs; cut to memory
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lm.data import TokenizedExample, pad_batch
from ..lm.sampling import Samples
from ..plans import EpochPlan


@dataclass(frozen=True)
class Rollouts:
    """One process's rollout batch: P prompts with G completions each; prompt p's are rows p*G .. p*G+G-1."""

    examples: list  # the prompts' examples, as train_data holds them
    prompt_ids_P: list[list[int]]
    samples: Samples  # completion ids, sampling log-probs, lengths, stopped (EOS) flags
    completions_N: list[str]  # decoded, special tokens skipped: what the reward functions read
    rewards_N_F: torch.Tensor  # (N, F) each reward function's value
    rewards_N: torch.Tensor  # (N,) Σ_f weight_f · reward_f
    pad_id: int
    generate_s: float
    score_s: float

    def batch(self, advantages_N: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared batch of these rollouts with `advantages_N`: see `rollout_batch`."""
        return rollout_batch(self.prompt_ids_P, self.samples, advantages_N, self.pad_id)


def rollout_batch(prompt_ids_P: list[list[int]], samples: Samples, advantages_N: torch.Tensor,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """N = P * G rows of prompt + completion, right-padded, in `lm.data`'s batch shape plus the RL fields:

        input_ids, target_tokens, position_ids  (N, T)  as `lm.data.pad_batch` builds them
        weights            (N, T) float  1 where the target is a completion token (EOS included), else 0
        advantages         (N,)          one per completion
        sampling_logprobs  (N, T)        the sampler's log-prob of each completion target, 0 elsewhere

    Right padding needs no attention mask: padding comes after every real token of its row.
    """
    G = samples.group_size
    completions_N = samples.completions()
    if len(prompt_ids_P) * G != len(completions_N) or advantages_N.shape != (len(completions_N),):
        raise ValueError(f"{len(prompt_ids_P)} prompts x G={G} do not match {len(completions_N)} completions and "
                         f"advantages of shape {tuple(advantages_N.shape)}")
    rows, starts_N = [], []
    for n, completion in enumerate(completions_N):
        prompt = prompt_ids_P[n // G]
        ids_L = torch.tensor(prompt + completion, dtype=torch.long)
        weights_L = torch.zeros(len(ids_L) - 1)
        weights_L[len(prompt) - 1:] = 1.0  # position i predicts token i + 1: the first completion token's is len - 1
        rows.append(TokenizedExample(n, ids_L[:-1], ids_L[1:], weights_L))
        starts_N.append(len(prompt) - 1)
    batch = pad_batch(rows, pad_id)
    sampling_N_T = torch.zeros(batch["weights"].shape, dtype=samples.logprobs_N_L.dtype)
    for n, (start, completion) in enumerate(zip(starts_N, completions_N)):
        sampling_N_T[n, start:start + len(completion)] = samples.logprobs_N_L[n, :len(completion)]
    device = samples.tokens_N_L.device
    return {**{k: v.to(device) for k, v in batch.items()}, "advantages": advantages_N,
            "sampling_logprobs": sampling_N_T.to(device)}


def split_rows(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive slices of `rows` rows (the last may be shorter), each cut to its longest trained row: the
    columns after every row's last trained target are padding, and skipping them saves their compute."""
    weights_N_T = batch["weights"]
    positions_T = torch.arange(1, weights_N_T.shape[1] + 1, device=weights_N_T.device)
    ends_N = torch.where(weights_N_T != 0, positions_T, 0).amax(dim=1).tolist()  # one host transfer
    parts = []
    for start in range(0, weights_N_T.shape[0], rows):
        width = max(ends_N[start:start + rows])
        parts.append({k: v[start:start + rows, :width] if v.ndim == 2 else v[start:start + rows]
                      for k, v in batch.items()})
    return parts


class WholeStepsPlan(EpochPlan):
    """The default data plan without the epoch's short last step: every step gives every process exactly
    `batch_size` prompts, so every process makes the same number of updates (DDP's all-reduces pair up)."""

    def epoch_steps(self, epoch: int) -> list[torch.Tensor]:
        return [s for s in super().epoch_steps(epoch) if len(s) == self.samples_per_step]

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step

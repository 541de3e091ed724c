"""Rollouts and the training batch built from them: pure, except the data plan that feeds them.

    rollouts = trainer.rollout(indices)                  # G completions of each prompt, decoded and scored
    batch = rollouts.batch(advantages_N)                 # the shared LM batch shape, plus advantages and
    micro_batches = split_rows(batch, rows=8)            #   the sampler's log-probs; cut to memory
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lm.sampling import Samples
from ..plans import EpochPlan, Step
from .envs import Episodes


@dataclass(frozen=True)
class Rollouts:
    """One process's rollout batch: P prompts with G completions each; prompt p's are rows p*G .. p*G+G-1. With an
    environment, the rows are episodes (`episodes`; `samples` is None and `prompt_ids_P` empty), `completions_N`
    their transcripts after the first observation, and `rewards_N_F` their returns (F = 1)."""

    examples: list  # the prompts' examples, as train_data holds them
    prompt_ids_P: list[list[int]]
    samples: Samples  # completion ids, sampling log-probs, lengths, stopped (EOS) flags
    completions_N: list[str]  # decoded, special tokens skipped: what the reward functions read
    rewards_N_F: torch.Tensor  # (N, F) each reward function's value
    rewards_N: torch.Tensor  # (N,) Σ_f weight_f · reward_f
    pad_id: int
    generate_s: float
    score_s: float
    indices_P: torch.Tensor | None = None  # the prompts' indices in train_data, when they come from there
    episodes: Episodes | None = None

    @property
    def group_size(self) -> int:
        return (self.episodes or self.samples).group_size

    @property
    def lengths_N(self) -> torch.Tensor:
        """(N,) tokens each row's policy sampled (a completion's length; an episode's actions together)."""
        if self.episodes is None:
            return self.samples.lengths_N
        return self.episodes.policy_tokens_N.to(self.rewards_N.device)

    @property
    def stopped_N(self) -> torch.Tensor:
        """(N,) bool: the completion ended at a stop token; the episode ended by the environment, not max_turns."""
        if self.episodes is None:
            return self.samples.stopped_N
        return torch.tensor(self.episodes.done_N, device=self.rewards_N.device)

    def batch(self, advantages_N: torch.Tensor, trained_N: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The shared batch of these rollouts with `advantages_N`: see `rollout_batch` and `transcript_batch`."""
        if self.episodes is not None:
            return transcript_batch(self.episodes, advantages_N, self.pad_id, trained_N)
        return rollout_batch(self.prompt_ids_P, self.samples, advantages_N, self.pad_id, trained_N)


def rollout_batch(prompt_ids_P: list[list[int]], samples: Samples, advantages_N: torch.Tensor,
                  pad_id: int, trained_N: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """N = P * G rows of prompt + completion, right-padded, in `lm.data`'s batch shape plus the RL fields:

        input_ids, target_tokens, position_ids  (N, T)  as `lm.data.pad_batch` builds them
        weights            (N, T) float  1 where the target is a completion token (EOS included), else 0
        advantages         (N,)          one per completion
        sampling_logprobs  (N, T)        the sampler's log-prob of each completion target, 0 elsewhere

    `trained_N` (bool, default all): rows whose completion is trained; the others get weight 0 everywhere (DAPO's
    overlong filtering masks truncated completions so). Right padding needs no attention mask: padding comes
    after every real token of its row.
    """
    G = samples.group_size
    completions_N = samples.completions()
    if len(prompt_ids_P) * G != len(completions_N) or advantages_N.shape != (len(completions_N),):
        raise ValueError(f"{len(prompt_ids_P)} prompts x G={G} do not match {len(completions_N)} completions and "
                         f"advantages of shape {tuple(advantages_N.shape)}")
    N = len(completions_N)
    if not N:
        raise ValueError("rollout_batch needs at least one completion")
    # Built whole, not row by row (a tensor op per row per field cost ~4 ms a step at N = 32): one list per row,
    # padded in python, one tensor per field; the numbers are those `pad_batch` of one example per row gives.
    prompts_N = [prompt_ids_P[n // G] for n in range(N)]
    ids_N = [prompt + completion for prompt, completion in zip(prompts_N, completions_N)]
    T = max(len(ids) for ids in ids_N) - 1  # position i predicts token i + 1: a row of L tokens has L - 1
    input_ids = torch.tensor([ids[:-1] + [pad_id] * (T + 1 - len(ids)) for ids in ids_N], dtype=torch.long)
    target_tokens = torch.tensor([ids[1:] + [pad_id] * (T + 1 - len(ids)) for ids in ids_N], dtype=torch.long)
    # The first completion token's target is at position len(prompt) - 1; a completion covers len(completion).
    starts_N1 = torch.tensor([len(prompt) - 1 for prompt in prompts_N], dtype=torch.long)[:, None]
    lengths_N1 = samples.lengths_N.cpu()[:, None]
    positions_T = torch.arange(T)
    completion_N_T = (positions_T >= starts_N1) & (positions_T < starts_N1 + lengths_N1)
    trained_N1 = torch.ones(N, 1, dtype=torch.bool) if trained_N is None else trained_N.cpu().bool()[:, None]
    batch = {"input_ids": input_ids, "target_tokens": target_tokens,
             "weights": (completion_N_T & trained_N1).to(torch.float32),
             "position_ids": positions_T.repeat(N, 1)}
    logprobs_N_L = samples.logprobs_N_L.cpu()
    sampling_N_T = torch.zeros(completion_N_T.shape, dtype=logprobs_N_L.dtype).masked_scatter_(
        completion_N_T, logprobs_N_L[torch.arange(logprobs_N_L.shape[1]) < lengths_N1])
    device = samples.tokens_N_L.device
    return {**{k: v.to(device) for k, v in batch.items()}, "advantages": advantages_N,
            "sampling_logprobs": sampling_N_T.to(device)}


def transcript_batch(episodes: Episodes, advantages_N: torch.Tensor, pad_id: int,
                     trained_N: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """N multi-turn transcripts in `rollout_batch`'s shape: a target carries weight 1 where the policy sampled it
    and 0 where the environment (an observation, the chat template's framing) put it, so the environment's tokens
    are never trained and never counted by a normalizer; `sampling_logprobs` are the sampler's on policy targets."""
    N = len(episodes)
    if advantages_N.shape != (N,) or not N:
        raise ValueError(f"{N} episodes do not match advantages of shape {tuple(advantages_N.shape)}")
    T = max(len(tokens) for tokens in episodes.tokens_N) - 1

    def padded(rows, value):  # position i predicts token i + 1: drop each row's first entry, pad to T
        return [row[1:] + [value] * (T + 1 - len(row)) for row in rows]

    input_ids = torch.tensor([t[:-1] + [pad_id] * (T + 1 - len(t)) for t in episodes.tokens_N], dtype=torch.long)
    weights = torch.tensor(padded(episodes.policy_N, 0), dtype=torch.float32)
    if trained_N is not None:
        weights *= trained_N.cpu().float()[:, None]
    device = advantages_N.device
    return {"input_ids": input_ids.to(device),
            "target_tokens": torch.tensor(padded(episodes.tokens_N, pad_id), dtype=torch.long, device=device),
            "weights": weights.to(device), "position_ids": torch.arange(T, device=device).repeat(N, 1),
            "advantages": advantages_N,
            "sampling_logprobs": torch.tensor(padded(episodes.logprobs_N, 0.0), dtype=episodes.logprob_dtype,
                                              device=device)}


def concat_samples(parts: list[Samples], pad_id: int) -> Samples:
    """The rows of several `Samples` of one group size, stacked in order, padded to the widest."""
    width = max(part.tokens_N_L.shape[1] for part in parts)

    def widened(tensor: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    return Samples(torch.cat([widened(p.tokens_N_L, pad_id) for p in parts]),
                   torch.cat([widened(p.logprobs_N_L, 0.0) for p in parts]),
                   torch.cat([p.lengths_N for p in parts]), torch.cat([p.stopped_N for p in parts]),
                   group_size=parts[0].group_size)


def take_groups(samples: Samples, groups: list[int]) -> Samples:
    """The rows of groups `groups` (group g is rows g*G .. g*G+G-1), in that order, cut to their widest row."""
    G = samples.group_size
    rows_N = (torch.tensor(groups, dtype=torch.long)[:, None] * G + torch.arange(G)).reshape(-1)
    rows_N = rows_N.to(samples.lengths_N.device)
    lengths_N = samples.lengths_N[rows_N]
    width = int(lengths_N.max()) if len(rows_N) else 0
    return Samples(samples.tokens_N_L[rows_N, :width], samples.logprobs_N_L[rows_N, :width], lengths_N,
                   samples.stopped_N[rows_N], group_size=G)


def split_rows(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive slices of `rows` rows (the last may be shorter), each cut to its longest trained row: the
    columns after every row's last trained target are padding, and skipping them saves their compute. A slice
    without a trained token keeps one column: it still takes its (zero) part in the update."""
    weights_N_T = batch["weights"]
    positions_T = torch.arange(1, weights_N_T.shape[1] + 1, device=weights_N_T.device)
    ends_N = torch.where(weights_N_T != 0, positions_T, 0).amax(dim=1).tolist()  # one host transfer
    parts = []
    for start in range(0, weights_N_T.shape[0], rows):
        width = max(1, *ends_N[start:start + rows])  # a slice with nothing to train (all masked) still takes part
        parts.append({k: v[start:start + rows, :width] if v.ndim == 2 else v[start:start + rows]
                      for k, v in batch.items()})
    return parts


class WholeStepsPlan(EpochPlan):
    """The default data plan without the epoch's short last step: every step gives every process exactly
    `batch_size` prompts, so every process makes the same number of updates (DDP's all-reduces pair up).

    Dynamic sampling: a loop step may take the prompts of the epoch's next steps too (`draw_extra`); once the loop
    step is done, the position moves past every step it drew, so a checkpoint resumes after them all and a resumed
    run draws the same prompts again. Draws stop at the epoch's end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = 0  # steps drawn beyond the current one by the loop step in progress

    def epoch_steps(self, epoch: int) -> list[torch.Tensor]:
        return [s for s in super().epoch_steps(epoch) if len(s) == self.samples_per_step]

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step

    def make_step(self, step_indices: torch.Tensor) -> Step:
        self.extra = 0  # a loop step begins (one abandoned by an exception draws its extra prompts again)
        return super().make_step(step_indices)

    def draw_extra(self) -> torch.Tensor | None:
        """This process's prompts of the epoch's next undrawn step, or None when the epoch has none left."""
        steps = self._steps_of(self.epoch)
        index = self.offset + 1 + self.extra
        if index >= len(steps):
            return None
        self.extra += 1
        return torch.cat(self.split(steps[index]))

    def advance(self) -> None:
        self.offset += 1 + self.extra
        self.extra = 0

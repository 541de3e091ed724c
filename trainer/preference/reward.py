"""RewardTrainer: a Bradley-Terry reward model trained on preference pairs, and its use as RL's scorer.

    from transformers import LlamaForSequenceClassification
    from paperloop.preference import RewardConfig, RewardTrainer, RewardModelScorer

    reward_model = LlamaForSequenceClassification(config)          # num_labels=1 (a scalar head)
    RewardTrainer(reward_model, RewardConfig(batch_size=8, output_dir="runs/rm"), tokenizer=tok,
                  train_data=pairs).fit()
    rl = RLTrainer(policy, rl_config, tokenizer=tok, train_data=prompts,
                   reward_fns=[RewardModelScorer(reward_model, tok)])  # one forward per rollout batch

The model is any `transformers` sequence-classification model with one label (or a module returning `.logits` of
shape (B, 1), or (B, T, 1) per position): the reward of a sequence is its score at its last token (a pair side's
EOS). The loss is -log σ(r_chosen - r_rejected - margin) (`margin`: an optional per-pair number in the data), plus
`center_rewards_coefficient` x mean((r_chosen + r_rejected)²) (Eisenstein et al. 2023; TRL's key), a pair mean, so
the step's loss does not depend on its split. Checkpoints are the model's `save_pretrained` folders:
`AutoModelForSequenceClassification.from_pretrained(checkpoint)` loads one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..lm.base import LMConfig, LMTrainer
from ..lm.data import prompt_ids
from ..lm.modules import disable_dropout
from .data import Pair, tokenize_pairs

log = logging.getLogger(__name__)

__all__ = ["RewardConfig", "RewardTrainer", "RewardModelScorer", "bradley_terry_loss"]


def bradley_terry_loss(chosen_P: torch.Tensor, rejected_P: torch.Tensor, margin_P: torch.Tensor | None = None,
                       center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """The Bradley-Terry reward model loss (Ouyang et al. 2022, eq. 1; Llama 2's margin): the mean over pairs of
    -log σ(r_w - r_l - margin), plus the coefficient x mean((r_w + r_l)²), which centres the rewards on 0. TRL's
    RewardTrainer computes the same."""
    difference_P = chosen_P - rejected_P - (margin_P if margin_P is not None else 0.0)
    loss = -F.logsigmoid(difference_P).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_P + rejected_P) ** 2).mean()
    return loss


@dataclass(frozen=True)
class RewardConfig(LMConfig):
    """TrainerConfig plus the reward model's options; `batch_size` counts pairs per micro-batch and process."""

    max_length: int = 1024  # positions of each side (prompt + completion); a longer one keeps its start
    center_rewards_coefficient: float = 0.0  # weight of mean((r_w + r_l)²): rewards centred on 0 (0: off)
    disable_dropout: bool = True  # as TRL's RewardConfig: a ranking loss of two forwards, with the same masks

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1:
            raise ConfigError(f"max_length: must be >= 1, got {self.max_length}")
        if not 0 <= self.center_rewards_coefficient < math.inf:
            raise ConfigError(f"center_rewards_coefficient: must be a finite number >= 0, got "
                              f"{self.center_rewards_coefficient}")


class RewardTrainer(LMTrainer):
    """Trains `model` to score the chosen side of each pair above the rejected one (`preference.data`'s pairs; an
    optional "margin" number per pair)."""

    def __init__(self, model: torch.nn.Module, config: RewardConfig, tokenizer, train_data, val_data=None,
                 callbacks=()):
        if not isinstance(config, RewardConfig):
            raise TypeError(f"config must be a RewardConfig, got {type(config).__name__}")
        self.skipped: dict[str, list[tuple[int, str]]] = {}
        train = self.tokenize(train_data, "train_data", tokenizer, config)
        val = self.tokenize(val_data, "val_data", tokenizer, config) if val_data is not None else None
        super().__init__(model, config, tokenizer, train_data=train, val_data=val, callbacks=callbacks)
        self.check_positions(max(len(pair) + 1 for pair in train + (val or [])), "the longest side of a pair")
        if config.disable_dropout:
            disable_dropout(self.unwrapped_model)

    def tokenize(self, data, name: str, tokenizer, config: RewardConfig) -> list[Pair]:
        kept, skipped = tokenize_pairs(data, tokenizer, config.max_length, config.split_special_tokens)
        self.skipped[name] = skipped
        if skipped:
            log.warning("%s: skipped %d pairs with a side left with no completion token (first: pair %d, %s)", name,
                        len(skipped), *skipped[0])
        if not kept:
            raise ValueError(f"{name}: none of its {len(skipped)} pairs has a completion token on both sides")
        return kept

    def collate(self, samples: list[Pair]) -> dict[str, torch.Tensor]:
        """Both sides of every pair, whole (prompt, completion, EOS), right-padded: chosen rows then rejected rows;
        `last` (2P,) is each row's last token, where its reward is read; `margin` (P,) the pairs' margins."""
        rows = [torch.cat([side.input_ids, side.target_tokens[-1:]]) for side in
                [p.chosen for p in samples] + [p.rejected for p in samples]]
        ids, attention, last = right_padded(rows, self.pad_id)
        return {"input_ids": ids, "attention_mask": attention, "last": last,
                "margin": torch.tensor([p.margin for p in samples], dtype=torch.float32)}

    def rewards(self, batch: dict, model=None) -> torch.Tensor:
        """(2P,) the model's score of each row at its last token."""
        return sequence_rewards(model or self.model, batch["input_ids"], batch["attention_mask"], batch["last"])

    def training_step(self, batch: dict) -> dict:
        chosen_P, rejected_P = self.rewards(batch).chunk(2)
        loss = bradley_terry_loss(chosen_P, rejected_P, batch["margin"].to(chosen_P), self.config.center_rewards_coefficient)
        return {"loss": loss, **reward_metrics(chosen_P, rejected_P)}

    def validation_step(self, batch: dict) -> dict:
        return self.training_step(batch)


@torch.no_grad()
def reward_metrics(chosen_P: torch.Tensor, rejected_P: torch.Tensor) -> dict[str, torch.Tensor]:
    """`rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (r_w > r_l), `rewards/margins`: pair means, the
    names DPOTrainer reports for its implicit reward."""
    chosen_P, rejected_P = chosen_P.detach().float(), rejected_P.detach().float()
    return {"rewards/chosen": chosen_P.mean(), "rewards/rejected": rejected_P.mean(),
            "rewards/accuracies": (chosen_P > rejected_P).float().mean(),
            "rewards/margins": (chosen_P - rejected_P).mean()}


def right_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows as (B, T) ids right-padded with `pad_id`, their (B, T) attention mask and (B,) last positions."""
    lengths_B = torch.tensor([len(row) for row in rows])
    ids_B_T = torch.full((len(rows), int(lengths_B.max())), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids_B_T[r, :len(row)] = torch.as_tensor(row)
    attention_B_T = (torch.arange(ids_B_T.shape[1]) < lengths_B[:, None]).long()
    return ids_B_T, attention_B_T, lengths_B - 1


def sequence_rewards(model, input_ids_B_T: torch.Tensor, attention_B_T: torch.Tensor,
                     last_B: torch.Tensor) -> torch.Tensor:
    """(B,) each row's reward: its score at position `last_B`. A transformers sequence classifier pools its scores
    itself, at the last token that is not its config's pad id — the wrong one when the pad id is EOS, which ends
    every side — so its `score` layer's per-position output (B, T, 1) is read instead, where it has one."""
    head, seen = _score_head(model), []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(out)) if head is not None else None
    try:
        logits = model(input_ids=input_ids_B_T, attention_mask=attention_B_T).logits
    finally:
        if handle is not None:
            handle.remove()
    if len(seen) == 1 and seen[0].ndim == 3:
        logits = seen[0]
    if logits.ndim == 3:  # per position: the row's last
        logits = logits[torch.arange(len(last_B), device=logits.device), last_B.to(logits.device)]
    if logits.shape[-1] != 1:
        raise ValueError(f"{type(model).__name__}: a reward model scores with one label, got logits of shape "
                         f"{tuple(logits.shape)} (num_labels=1)")
    return logits[:, 0].to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64


def _score_head(model) -> torch.nn.Module | None:
    """The per-position score layer of a transformers sequence classifier (`score`), under peft/DDP wrappers."""
    for module in model.modules():
        head = getattr(module, "score", None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


class RewardModelScorer:
    """A trained reward model as RLTrainer's reward function: `batched`, so the trainer calls it once per rollout
    batch — `scorer(prompts, completions, examples) -> rewards` — and the model scores them all in one forward (in
    chunks of `batch_size`), not one call per completion. A prompt is tokenized as RL tokenizes it (`prompt_ids`),
    the completion appended with the tokenizer's EOS, as the reward model was trained."""

    batched = True

    def __init__(self, model, tokenizer, batch_size: int = 64, name: str = "reward_model"):
        self.model, self.tokenizer, self.batch_size, self.__name__ = model.eval(), tokenizer, batch_size, name

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str], examples: list) -> list[float]:
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        rows = [prompt_ids(prompt, self.tokenizer) + self.tokenizer(completion, add_special_tokens=False)["input_ids"]
                + [self.tokenizer.eos_token_id] for prompt, completion in zip(prompts, completions)]
        rewards = []
        for start in range(0, len(rows), self.batch_size):
            ids, attention, last = right_padded(rows[start:start + self.batch_size], pad)
            rewards += sequence_rewards(self.model, ids.to(device), attention.to(device), last).tolist()
        return rewards

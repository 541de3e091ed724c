"""DPOTrainer: preference optimization of a causal LM (DPO and its family) on prompt / chosen / rejected pairs.

    from paperloop.preference import DPOConfig, DPOTrainer

    config = DPOConfig(beta=0.1, loss=("sigmoid",), batch_size=8, lr=5e-6, max_epochs=1, output_dir="runs/dpo")
    trainer = DPOTrainer(model, config, tokenizer=tok, train_data=pairs, val_data=val_pairs)
    trainer.fit()                                   # after a crash: trainer.fit(resume="latest")

A step takes `batch_size` pairs per micro-batch (x `grad_accum_steps`, x processes); each micro-batch is one forward
of its chosen and rejected sides together (`data.pair_batch`), the output layer run on completion positions only, in
chunks (`lm.losses.forward_logprobs`: no tokens x vocabulary tensor). The losses are registered pure functions of the
per-pair summed log-probs (`preference.losses`), combined by weight (`loss`, `loss_weights`: RPO is ("sigmoid",
"sft")). Every pair weighs 1 in the engine's weighted step, and `sft`'s token mean gets the step's counts, so the
loss and its gradient are the same however a step is split into micro-batches and processes.

The reference (losses that need one) is the initial policy, taken when the trainer is built — before a checkpoint
is loaded — as a frozen copy, or with LoRA the base itself, adapters off (`LMTrainer`'s `reference=True`); its weights'
checksum is in every checkpoint, and a resume built from another initial model is refused. With
`precompute_ref_logprobs`, the reference scores every pair once, before the first step, and the scores are kept in
`output_dir/reference/` keyed by the reference's checksum and the tokenized pairs, so a resumed run reuses them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..lm.base import LMConfig, LMTrainer, digest
from ..lm.modules import disable_dropout
from ..plans import eval_batches
from .data import Pair, pair_batch, side_sums, tokenize_pairs
from .losses import PREFERENCE_LOSSES, PairLogps, PreferenceOptions, loss_traits, preference_loss

log = logging.getLogger(__name__)

__all__ = ["DPOConfig", "DPOTrainer"]


@dataclass(frozen=True)
class DPOConfig(LMConfig):
    """TrainerConfig plus the preference options; `batch_size` counts pairs per micro-batch and process."""

    max_length: int = 1024  # positions each side (prompt + completion) keeps; a longer one keeps its start
    loss: tuple[str, ...] = ("sigmoid",)  # names in paperloop.preference.PREFERENCE_LOSSES, summed by weight
    loss_weights: Optional[tuple[float, ...]] = None  # one per loss; None: 1 each
    beta: float = 0.1  # the implicit reward's inverse temperature β (IPO: τ; SimPO: its β)
    label_smoothing: float = 0.0  # cDPO (sigmoid) and robust: the assumed rate of flipped labels
    ipo_normalize_length: bool = True  # ipo: log-ratios averaged over their tokens (TRL) or summed (OpenRLHF)
    simpo_gamma: float = 0.5  # simpo: the target margin γ
    precompute_ref_logprobs: bool = False  # score every pair with the reference once, before training, and keep it
    disable_dropout: bool = True  # the policy's log-ratios against the (eval-mode) reference must start at 0 (TRL too)

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1:
            raise ConfigError(f"max_length: must be >= 1, got {self.max_length}")
        if not self.loss or any(name not in PREFERENCE_LOSSES for name in self.loss):
            raise ConfigError(f"loss: names in {sorted(PREFERENCE_LOSSES)}, got {self.loss!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
            raise ConfigError(f"loss_weights: one weight per loss ({len(self.loss)}), got {self.loss_weights!r}")
        try:
            PreferenceOptions(**self.loss_settings)
        except ValueError as e:
            raise ConfigError(str(e).replace(" must ", ": must ", 1)) from None
        reads = {key for name in self.loss for key in loss_traits(name).reads}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in self.loss_settings.items():
            if key not in reads and value != defaults[key]:
                raise ConfigError(f"{key}: no loss of {self.loss!r} reads it, so {key}={value!r} would change nothing")
        if self.precompute_ref_logprobs and not self.needs_reference:
            raise ConfigError(f"precompute_ref_logprobs: the losses {self.loss!r} use no reference")

    @property
    def loss_settings(self) -> dict:
        """The losses' settings (`PreferenceOptions`' fields, each a key of this config of the same name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(PreferenceOptions)}

    @property
    def needs_reference(self) -> bool:
        return any(loss_traits(name).needs_reference for name in self.loss)


class DPOTrainer(LMTrainer):
    """Preference optimization of `model` (a transformers causal LM) on `train_data`: pairs `{"prompt", "chosen",
    "rejected"}` (strings, or chat messages) as a list, a map-style dataset or a JSONL path (`preference.data`).
    A pair with nothing left to score after truncation is skipped and counted in `self.skipped`."""

    def __init__(self, model: torch.nn.Module, config: DPOConfig, tokenizer, train_data, val_data=None, callbacks=()):
        if not isinstance(config, DPOConfig):
            raise TypeError(f"config must be a DPOConfig, got {type(config).__name__}")
        self.skipped: dict[str, list[tuple[int, str]]] = {}
        train = self.tokenize(train_data, "train_data", tokenizer, config)
        val = self.tokenize(val_data, "val_data", tokenizer, config) if val_data is not None else None
        super().__init__(model, config, tokenizer, train_data=train, val_data=val, callbacks=callbacks,
                         reference=config.needs_reference)
        self.check_positions(max(len(pair) for pair in train + (val or [])), "the longest side of a pair")
        if config.disable_dropout:
            disable_dropout(self.unwrapped_model)
        self._cached_reference: dict[str, torch.Tensor] | None = None

    def tokenize(self, data, name: str, tokenizer, config: DPOConfig) -> list[Pair]:
        kept, skipped = tokenize_pairs(data, tokenizer, config.max_length, config.split_special_tokens)
        self.skipped[name] = skipped
        if skipped:
            log.warning("%s: skipped %d of %d pairs with a side left with nothing to score (first: pair %d, %s)",
                        name, len(skipped), len(kept) + len(skipped), *skipped[0])
        if not kept:
            raise ValueError(f"{name}: none of its {len(skipped)} pairs has tokens to score on both sides")
        return kept

    def compute_fingerprints(self) -> dict[str, str]:
        """The tokenizer's, and the tokenized pairs' (each side's ids and loss weights)."""
        return {**super().compute_fingerprints(), "train_data": pairs_digest(self.train_data)}

    # ---- a step -------------------------------------------------------------------------------

    def collate(self, samples: list[Pair]) -> dict[str, torch.Tensor]:
        return pair_batch(samples, self.pad_id)

    def train_step(self, step) -> dict:
        """One update over the step's micro-batches, each told the step's pairs and chosen tokens over every
        process (`sft`'s token mean); the metrics a pair-weighted mean over every micro-batch and process."""
        batches = [self.fetch(indices) for indices in step.micro_batches]
        chosen_tokens = sum(pair_batch_chosen_tokens(batch) for batch in batches)
        tokens = float(self.reduce_sum(torch.tensor(chosen_tokens, dtype=torch.float64, device=self.device)))
        for batch in batches:
            batch["step_pairs"], batch["step_chosen_tokens"] = step.weight, tokens
        parts = []

        def loss_fn(batch: dict) -> dict:
            loss, metrics = self.preference_step(batch)
            parts.append({k: v * len(batch["pair_index"]) for k, v in metrics.items()})
            return {"loss": loss}

        outputs = self.update(batches, step.shares(), loss_fn)
        keys = sorted(parts[0])
        sums = self.reduce_sum(torch.stack([sum(p[k] for p in parts) for k in keys]).double())
        return {**outputs, **{k: total / step.weight for k, total in zip(keys, sums.unbind())}}

    def training_step(self, batch: dict) -> torch.Tensor:
        return self.preference_step(batch)[0]

    def preference_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The configured loss of one pair batch, and its metrics (`preference.losses.preference_loss`)."""
        c = self.config
        chosen, rejected = side_sums(self.forward(batch).logprobs, batch["weights"])
        chosen_lengths, rejected_lengths = side_sums(torch.ones_like(batch["weights"]), batch["weights"])
        ref_chosen, ref_rejected = self.reference_sums(batch) if c.needs_reference else (None, None)
        pairs = PairLogps(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
                          batch.get("step_pairs"), batch.get("step_chosen_tokens"))
        return preference_loss(pairs, c.loss, c.loss_weights, **c.loss_settings)

    @torch.no_grad()
    def reference_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's summed log-probs of each pair's chosen and rejected completion: precomputed, or from a
        no-grad forward of the same batch."""
        if self.config.precompute_ref_logprobs:
            cache = self.precomputed_reference()
            key = "val" if batch.get("validation") else "train"
            index = batch["pair_index"].cpu()
            return (cache[f"{key}.chosen"][index].to(self.device), cache[f"{key}.rejected"][index].to(self.device))
        return side_sums(self.reference_logprobs(batch), batch["weights"])

    # ---- the reference's scores, once ---------------------------------------------------------

    def precomputed_reference(self) -> dict[str, torch.Tensor]:
        """Every train (and val) pair's reference sums by pair index, from `output_dir/reference/<key>.safetensors`
        when a run with the same reference and pairs wrote it, else computed now (and written by the main
        process)."""
        if self._cached_reference is not None:
            return self._cached_reference
        key = digest([self.reference_checksum.double().numpy().tobytes(), pairs_digest(self.train_data).encode(),
                      pairs_digest(self.val_data or []).encode()])[:24]
        path = Path(self.config.output_dir) / "reference" / f"{key}.safetensors"
        if path.is_file():
            self._cached_reference = load_file(str(path))
            log.info("reference log-probs from %s", path)
            return self._cached_reference
        cache = {}
        for name, pairs in (("train", self.train_data), ("val", self.val_data or [])):
            chosen = torch.zeros(max((p.index for p in pairs), default=-1) + 1, dtype=torch.float64)  # by pair index
            rejected = chosen.clone()
            for indices in eval_batches(len(pairs), self.config.batch_size) if pairs else []:
                batch = self.to_device(pair_batch([pairs[i] for i in indices.tolist()], self.pad_id))
                with self.autocast():
                    scores = side_sums(self.reference_logprobs(batch), batch["weights"])
                chosen[batch["pair_index"].cpu()], rejected[batch["pair_index"].cpu()] = (s.double().cpu() for s in scores)
            cache.update({f"{name}.chosen": chosen, f"{name}.rejected": rejected})
        if self.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(cache, str(path.with_suffix(".tmp")))
            os.replace(path.with_suffix(".tmp"), path)
        self._cached_reference = cache
        return cache

    # ---- validation ---------------------------------------------------------------------------

    def validation_step(self, batch: dict) -> dict:
        """The loss and the pair metrics (TRL's names) of a validation batch: `val/loss`, `val/rewards/chosen`,
        ..., means over the pairs."""
        batch["validation"] = True
        loss, metrics = self.preference_step(batch)
        return {"loss": loss, **metrics}


def pair_batch_chosen_tokens(batch: dict) -> float:
    """The chosen sides' trained tokens of a pair batch (its first half of rows)."""
    return float(batch["weights"].chunk(2)[0].sum())


def pairs_digest(pairs: list[Pair]) -> str:
    return digest(t.numpy().tobytes() for pair in pairs for side in (pair.chosen, pair.rejected)
                  for t in (side.input_ids, side.target_tokens, side.weights))

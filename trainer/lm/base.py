"""The language-model layer under SFTTrainer and RLTrainer: what both need, and no loop code.

    class MyLMTrainer(LMTrainer): ...       # SFTTrainer and RLTrainer are two of these

- the tokenizer and one pad rule (`pad_token_id`: the tokenizer's pad token, else its EOS, as TRL does);
- optional LoRA adapters through peft (`config.lora`): only the adapters train, checkpoints hold only them;
- how its weights are written and read (`write_weights`, `load_weights`: `save_pretrained` folders, LoRA adapters
  alone, tied weights once; `lm.weights`), and the tokenizer written into every checkpoint, so
  `AutoModelForCausalLM.from_pretrained(checkpoint)` and `AutoTokenizer.from_pretrained(checkpoint)` load it;
- one forward, `forward(batch)`: the targets' log-probs, and on request their entropy and whether each is the
  argmax (`lm.losses.forward_logprobs`, under the trainer's autocast), the one place a language model is scored,
  with no (tokens x vocabulary) logits ever made;
- one `generate`: KV-cached sampling (`lm.sampling.sample`) with the trainer's stop and pad ids;
- `call_scorer`: a user's function (a reward, an `eval_fn`) called so that a failure names the example.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..base import BaseTrainer
from ..distributed import shard_model
from ..config import ConfigError, TrainerConfig
from ..steps import adamw
from .lora import LORA_BASE, LoraSettings, apply_lora, base_fingerprint
from .losses import TokenScores, forward_logprobs
from .modules import check_reference, frozen_reference, weight_checksum
from .sampling import Samples, default_stop_token_ids, sample
from .weights import load_state_or_adapter, no_shard_progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMConfig(TrainerConfig):
    """TrainerConfig plus what every language-model trainer takes."""

    lora: Optional[LoraSettings] = None  # LoRA adapters through peft (the `lora` extra); None: full fine-tuning
    split_special_tokens: bool = False  # read control tokens typed in prompts, completions and texts as plain text
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward (non-reentrant): less memory
    # Checkpointing recomputes the same operations, so it changes memory, not the numbers: a resume may switch it.
    resume_may_change = TrainerConfig.resume_may_change + ("gradient_checkpointing",)

    def __post_init__(self):
        if isinstance(self.lora, dict):  # SFTConfig(lora={"r": 8}) from Python, as YAML allows
            object.__setattr__(self, "lora", LoraSettings.from_dict(self.lora))
        super().__post_init__()


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (padding is never trained nor attended
    to, so any id serves); a tokenizer with neither is an error."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        log.info("the tokenizer has no pad_token: padding with its eos_token %r", tokenizer.eos_token)
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set one (e.g. tokenizer.pad_token = ...)")


class ScoreError(Exception):
    """A user's scoring function (a reward function, an `eval_fn`) failed; the message names the function and the
    example, so a caller passes it on as it is."""


class ScorerRaised(ScoreError, RuntimeError):
    """The scoring function raised (the original exception is the cause)."""


class NotAScore(ScoreError, ValueError):
    """The scoring function returned something that is not a finite number."""


def call_scorer(fn, *args, name: str, where: str) -> float:
    """`fn(*args)` as a float: what a reward function or an `eval_fn` returns. An exception, or a value that is
    not a finite number, is an error naming the function (`name`) and the example (`where`): a NaN would
    otherwise spread through the metrics with no trace of where it came from."""
    try:
        value = fn(*args)
    except Exception as e:
        raise ScorerRaised(f"{name} raised {type(e).__name__} on {where}: {e}") from e
    number = as_score(value)
    if number is None:
        raise NotAScore(f"{name} returned {value!r:.40} on {where}: a score is a finite number, at most "
                        f"{SCORE_LIMIT:.3g} in size (bool, int, float, a numpy number or a one-element tensor)")
    return number


# Scores are trained on in float32: past its range a reward overflows to inf somewhere later, naming nothing.
SCORE_LIMIT = float(torch.finfo(torch.float32).max)


def as_score(value) -> float | None:
    """`value` as a float when it is one finite real number within float32's range (bools, numpy numbers and
    one-element real tensors included), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    elif isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int such as 10**400
        return None
    return number if math.isfinite(number) and abs(number) <= SCORE_LIMIT else None


class LMTrainer(BaseTrainer):
    """A trainer of a `transformers` causal LM with its tokenizer. `stop_token_ids`: the ids that end a
    generation (default: EOS, the tokenizer's and the model's generation config's, and the chat template's
    end-of-turn marker, as `lm.sampling.default_stop_token_ids` finds them)."""

    def __init__(self, model: torch.nn.Module, config: LMConfig, tokenizer, train_data=None, val_data=None,
                 callbacks=(), stop_token_ids: Sequence[int] | None = None, reference: bool = False,
                 teacher: torch.nn.Module | None = None, teacher_tokenizer=None):
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig (SFTConfig, RLConfig), got {type(config).__name__}")
        self.tokenizer, self.pad_id = tokenizer, pad_token_id(tokenizer)
        check_vocabulary(model, tokenizer)
        if config.lora is not None and config.strategy == "fsdp":
            raise ConfigError("strategy: 'fsdp' with lora is not supported (the adapters are a small share of the "
                              "weights: DDP holds them cheaply); use strategy='ddp'")
        if config.lora is not None:
            from accelerate import PartialState  # the trainer's Accelerator is made after the model is wrapped

            # The base's tensors (references, no copy), fingerprinted when a checkpoint first needs it: the adapters
            # of a run fit only the weights they were trained on, whatever the folder holds later
            self._lora_base = (dict(model.state_dict()), getattr(model, "dtype", torch.float32))
            # peft draws the adapters' initial weights from the global RNG: seeded here, they are a function of the
            # run's seed (a rebuilt trainer gets the same ones), and the caller's RNG is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = apply_lora(model, config.lora, config.output_dir, write=PartialState().is_main_process)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        # The reference is taken now: before the model is sharded (a sharded model cannot be copied) and before a
        # checkpoint's trained weights are loaded into it (a resumed run's reference is never the trained policy)
        self.reference, self.reference_checksum = frozen_reference(model, config.lora is not None) if reference \
            else (None, None)
        self.teacher, self.teacher_checksum = check_teacher(teacher, teacher_tokenizer, tokenizer)
        super().__init__(model, config, train_data=train_data, val_data=val_data, callbacks=callbacks)
        for frozen in (self.reference, self.teacher):
            if frozen is not None:
                frozen.to(self.device)
                if self.sharded:  # sharded as the policy is; its forwards run in lockstep with the policy's
                    shard_model(frozen)
        self._stop_token_ids = _check_ids(stop_token_ids) if stop_token_ids is not None else None

    @property
    def stop_token_ids(self) -> list[int]:
        """The ids that end a generation: found on first use (a trainer that never generates needs none, and
        is not warned about a chat template's generation prompt)."""
        if self._stop_token_ids is None:
            self._stop_token_ids = default_stop_token_ids(self.tokenizer, self.unwrapped_model)
        return self._stop_token_ids

    def compute_fingerprints(self) -> dict[str, str]:
        prints = {"tokenizer": tokenizer_fingerprint(self.tokenizer)}
        if self.config.lora is not None:
            prints[LORA_BASE] = base_fingerprint(*self._lora_base)
        return prints

    def fingerprint_mismatch(self, name: str) -> str:
        if name != LORA_BASE:
            return super().fingerprint_mismatch(name)
        folder = self.unwrapped_model.peft_config["default"].base_model_name_or_path
        return (f"lora base model: {folder} does not hold the weights this run's adapters were trained on (their "
                "checksum differs from the checkpoint's): the folder holds other weights now, or the base was loaded "
                "in another dtype? Build the trainer on the base the run started from, or start a new run")

    # ---- the frozen reference (RL's KL, DPO's log-ratios) ---------------------------------------------
    # `reference=True`: score against the initial policy, a frozen copy of the model as given to the trainer, or with
    # LoRA the base itself (its adapters switched off, no copy). It is rebuilt, not checkpointed: the checkpoint holds
    # its weights' checksum, and a resume built with another initial model is refused.

    def reference_logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """The reference's log-probs (B, T) of the batch's targets: the frozen copy's, or with LoRA the base's."""
        if self.reference is not None:
            return self.forward(batch, self.reference, temperature).logprobs
        with self.unwrapped_model.disable_adapter():
            return self.forward(batch, self.unwrapped_model, temperature).logprobs

    def teacher_logprobs(self, batch: dict) -> torch.Tensor:
        """The teacher's log-probs (B, T) of the batch's targets, at temperature 1 (its own distribution)."""
        return self.forward(batch, self.teacher).logprobs

    def extra_state(self) -> dict:
        checksums = {"reference_checksum": self.reference_checksum, "teacher_checksum": self.teacher_checksum}
        return {key: value for key, value in checksums.items() if value is not None}

    def load_extra_state(self, state: dict) -> None:
        check_reference(state.get("reference_checksum"), self.reference_checksum, type(self).__name__)
        check_reference(state.get("teacher_checksum"), self.teacher_checksum, type(self).__name__, "teacher")

    def check_positions(self, longest: int, what: str) -> None:
        """A sequence of `longest` positions against the model's context (`max_position_embeddings`): past it a
        learned position table has no row (an IndexError deep in torch), so that is an error now; rotary
        positions go on, past what the model was trained on, so that is a warning."""
        config = getattr(self.unwrapped_model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not limit or longest <= limit:
            return
        rotary = any(getattr(config, key, None) is not None for key in ("rope_theta", "rope_scaling", "rope_parameters"))
        message = (f"{what} is {longest} positions, more than the model's max_position_embeddings={limit}")
        if not rotary:
            raise ValueError(f"{message}: its learned position table has no row for the rest; shorten them "
                             "(max_length, max_new_tokens)")
        log.warning("%s: its rotary positions go on past what it was trained on", message)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters
        return adamw(trainable, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def write_artifacts(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)  # so AutoTokenizer.from_pretrained(checkpoint) works

    @property
    def writes_frozen_weights(self) -> bool:
        """A LoRA checkpoint holds the adapter alone (peft's `save_pretrained`): an async save need not copy the
        frozen base (and, left out of the copy, it is checked not to be read)."""
        return self.config.lora is None

    def write_weights(self, model: torch.nn.Module, directory: Path, state_dict: dict | None = None) -> None:
        """The engine's writer, the model's own `save_pretrained` folder (a LoRA model: its adapter alone), without
        the "Writing model shards" bar transformers draws at every save."""
        with no_shard_progress_bar():
            super().write_weights(model, directory, state_dict)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """The whole state, or a LoRA model's adapter alone (what its checkpoints hold): `lm.weights`."""
        load_state_or_adapter(self.unwrapped_model, tensors)

    def forward(self, batch: dict, model=None, temperature: float = 1.0, *, entropy: str | None = None,
                greedy: bool = False) -> TokenScores:
        """`TokenScores` (log-probs (B, T) of the batch's targets under softmax(logits / temperature); with
        `entropy` "detached" or "trained" their entropy, with `greedy` whether each is the argmax) from `model`
        (default: the trained one), under autocast when `precision` asks: `lm.losses.forward_logprobs`, which
        runs the output layer on trained positions only, in chunks."""
        with self.autocast():
            return forward_logprobs(self.model if model is None else model, batch, temperature, entropy=entropy,
                                    greedy=greedy)

    def generate(self, prompt_ids_P: list[list[int]], num_samples: int = 1, *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Samples:
        """`num_samples` completions of each prompt (token ids), KV-cached, stopping at `stop_token_ids`; drawn
        only from `generator` (greedy decoding, temperature 0, draws nothing and needs none)."""
        if generator is None:
            if temperature != 0:
                raise ValueError("generate: sampling at temperature > 0 draws from a generator; pass one (the "
                                 "trainer checkpoints the ones it registers)")
            generator = torch.Generator(device=self.device)
        return sample(self.unwrapped_model, prompt_ids_P, num_samples, max_new_tokens, generator=generator,
                      temperature=temperature, top_p=top_p, eos_token_id=self.stop_token_ids, pad_token_id=self.pad_id)


def check_teacher(teacher, teacher_tokenizer, tokenizer) -> tuple[torch.nn.Module | None, torch.Tensor | None]:
    """A teacher to score the student's tokens (distillation), frozen in place (eval mode, no gradient), and its
    weights' checksum; or (None, None). It must read the student's ids as its own: its embedding must cover the
    student's tokenizer, and `teacher_tokenizer`, when given, must map every token to the same id (else an error
    naming the first that differs)."""
    if teacher is None:
        return None, None
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher: a torch.nn.Module (a transformers causal LM), got {type(teacher).__name__}")
    check_vocabulary(teacher, tokenizer)
    if teacher_tokenizer is not None:
        mine, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        for token in sorted(set(mine) | set(theirs), key=lambda t: (mine.get(t, len(mine)), t)):
            if mine.get(token) != theirs.get(token):
                raise ValueError(f"teacher: its tokenizer is not the student's: token {token!r} is id "
                                 f"{mine.get(token)} for the student and {theirs.get(token)} for the teacher, so the "
                                 "teacher would score other tokens than the student sampled")
    teacher.eval().requires_grad_(False)
    return teacher, weight_checksum(teacher.parameters())


def enable_gradient_checkpointing(model) -> None:
    """transformers' gradient checkpointing of every decoder layer, non-reentrant, and the model in train mode.

    Non-reentrant, because the reentrant kind gives no gradient through a layer whose inputs need none: with LoRA
    (frozen embeddings) it would silently train nothing, unless the embeddings' outputs were made to require grad.
    Train mode, because transformers checkpoints only while `model.training` (a `from_pretrained` model starts in
    eval mode): otherwise the flag would be set and nothing recomputed."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # peft
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(inner).__name__} does not support it (transformers' "
                          "supports_gradient_checkpointing is False)")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2's name for it
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()


def check_vocabulary(model, tokenizer) -> None:
    """Every id the tokenizer can produce must have a row in the model's input embedding (else an IndexError deep
    inside torch names nothing)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and rows < len(tokenizer):
        raise ValueError(f"model: its input embedding has {rows} rows but the tokenizer has {len(tokenizer)} tokens, so "
                         f"ids from {rows} on have no embedding; resize it first (model.resize_token_embeddings("
                         "len(tokenizer))) or use the tokenizer the model was built for")


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides how text becomes ids: the whole fast tokenizer (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor, added tokens), else the vocabulary; the special tokens; the chat
    template. Two tokenizers of the same size but other ids differ here."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([str(tokenizer.special_tokens_map), tokenizer.chat_template])
    return hashlib.sha256((spec + extra).encode()).hexdigest()


def digest(parts) -> str:
    """sha256 over a sequence of bytes objects (tensors' bytes, JSON texts), each length-prefixed."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _check_ids(ids) -> list[int]:
    ids = list(ids)
    if not ids or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"stop_token_ids: a non-empty list of token ids, got {ids!r:.80}")
    return sorted({int(i) for i in ids})  # a set of ids: one order, as the default has, so [5, 2] is [2, 5]

"""SFTTrainer: supervised fine-tuning of any `transformers` causal LM on prompt/completion, chat or text examples.

    from paperloop import SFTTrainer, SFTConfig
    trainer = SFTTrainer(model, SFTConfig(max_length=512, packing=True, batch_size=16, max_epochs=3,
                                          output_dir="runs/sft"),
                         tokenizer=tok, train_data="train.jsonl", val_data=val_examples)
    trainer.fit()                         # or trainer.fit(resume="latest") after a crash

Examples are tokenized and masked once, up front (`lm.data.tokenize_examples`): completion-only for
prompt/completion, assistant turns for chat, everything for text, EOS trained. A malformed example is an
error naming it; one left with nothing to train after truncation is skipped, counted in `trainer.skipped`
and logged. Each example weighs its trained tokens, so a step's loss is the mean over every trained token of
the step, however it is split into micro-batches and processes (the engine's weighted step).

With `teacher=model` (a frozen model sharing the tokenizer: `LMTrainer` checks it and records its checksum, and a
resume with another teacher is refused) the loss is off-policy distillation (`lm.distill`): on the dataset's own
completions the student matches the teacher's next-token distribution (`distill`: forward_kl, top_k, top_k_renormalized or jsd), mixed
with the hard-label loss by `distill_weight`, neither model's (tokens x vocabulary) logits ever made.

Batches are the data plan's (`lm.plans`, chosen in `make_plan` and nowhere else): padded, one example per row
(optionally steps bucketed by length: `bucket_window`), or packed (`packing=True`) into rows of `pack_length`
(default 2 x max_length) with `position_ids` restarting per example; the one forward (`lm.losses`) passes
`use_cache=False`, which makes transformers keep packed examples apart. Validation batches are padded.

Metrics per step: `train/loss`, `perf/tokens_per_s` (trained tokens, all processes), `train/padding_fraction`
(this process), `optim/lr`, `optim/grad_norm`; `time/compile_s` on steps that compiled (`compile=True`), which
are left out of tokens_per_s. Validation: `val/loss` (per trained token), `val/perplexity`, `val/exact_match`
(the fraction of examples whose every trained token is the model's argmax: what greedy decoding of the
completion would reproduce), and `val/score`, the mean of `eval_fn(example, generated_text)` over greedy
generations when an `eval_fn` is given.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import ConfigError
from ..evaluation import Weighted
from ..plans import EpochPlan, lockstep_eval_batches
from .base import LMConfig, LMTrainer, call_scorer, digest
from .data import TokenizedExample, example_shape, load_examples, pad_batch, prompt_ids, tokenize_examples
from .distill import DIVERGENCES, distill_loss, divergence_fn, divergence_reads
from .losses import cross_entropy
from .plans import BucketedPlan, PackedPlan, PaddedPlan
from .registry import is_int

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # tests set "aot_eager": the same graphs, without minutes of code generation


@dataclass(frozen=True)
class SFTConfig(LMConfig):
    max_length: int = 1024  # positions one example keeps; a longer one keeps its start (counted as truncated)
    packing: bool = False  # several examples per row, attention kept inside each
    pack_length: Optional[int] = None  # positions per packed row; None: 2 x max_length (see lm/plans.py)
    bucket_window: int = 0  # padded: sort steps by length within windows of this many steps (8 measured); 0 off
    train_prompt: bool = False  # prompt/completion: train the prompt's tokens too
    compile: bool = False  # torch.compile the model's forward (dynamic shapes); compile time is logged apart
    eval_max_new_tokens: int = 64  # greedy generation length for eval_fn
    # With a teacher (SFTTrainer(teacher=...)): off-policy distillation on the dataset's completions (lm.distill)
    distill: str = "forward_kl"  # divergence from the teacher: forward_kl | top_k | top_k_renormalized | jsd (lm.distill)
    distill_weight: float = 1.0  # loss = (1 - w) NLL of the data + w divergence; 0: plain SFT, 1: distillation only
    distill_top_k: int = 20  # top_k(_renormalized): the teacher's k most likely tokens (the Tinker cookbook's 20)
    distill_beta: float = 0.5  # jsd: GKD's β; 0 is forward KL, 1 reverse KL

    DISTILL_KEYS = ("distill", "distill_weight", "distill_top_k", "distill_beta")

    # compile changes rounding only (its kernels are not bitwise eager's): a resume may switch it.
    resume_may_change = LMConfig.resume_may_change + ("eval_max_new_tokens", "compile")

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1 or self.eval_max_new_tokens < 1:
            key = "max_length" if self.max_length < 1 else "eval_max_new_tokens"
            raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.pack_length is not None and not self.packing:
            raise ConfigError(f"pack_length: {self.pack_length} is a packed row's length, but packing is off; set "
                              "packing=True, or leave pack_length unset")
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ConfigError(f"pack_length: {self.pack_length} is shorter than max_length={self.max_length}, so "
                              "a full-length example would fit no row")
        if self.bucket_window < 0:
            raise ConfigError(f"bucket_window: must be >= 0 (0 turns bucketing off), got {self.bucket_window}")
        if self.packing and self.bucket_window:
            raise ConfigError("bucket_window: bucketing is for padded batches; packing=True leaves no padding to save")
        self._check_distillation()

    def _check_distillation(self) -> None:
        if self.distill not in DIVERGENCES:
            raise ConfigError(f"distill: unknown divergence {self.distill!r}; choose one of {sorted(DIVERGENCES)}")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"distill_weight: must be in [0, 1], got {self.distill_weight}")
        if not is_int(self.distill_top_k) or self.distill_top_k < 1:
            raise ConfigError(f"distill_top_k: must be an integer >= 1, got {self.distill_top_k!r}")
        if not 0 <= self.distill_beta <= 1:
            raise ConfigError(f"distill_beta: must be in [0, 1], got {self.distill_beta}")
        reads = divergence_reads(self.distill)
        for setting in ("top_k", "beta"):
            key = f"distill_{setting}"
            if setting not in reads and getattr(self, key) != _DEFAULTS[key]:
                raise ConfigError(f"{key}: set, but distill={self.distill!r} does not read it (it would be ignored)")

    @property
    def distilling_changed(self) -> list[str]:
        """The distillation settings changed from their defaults (an error without a teacher)."""
        return [key for key in self.DISTILL_KEYS if getattr(self, key) != _DEFAULTS[key]]

    @property
    def row_length(self) -> Optional[int]:
        """Positions per packed row, or None when batches are padded."""
        return (self.pack_length or 2 * self.max_length) if self.packing else None


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SFTConfig)}


class SFTTrainer(LMTrainer):
    """Fine-tunes `model` (a `transformers` causal LM) on `train_data` with the loss on trained tokens only.

    `train_data`/`val_data`: a list of example dicts, a map-style dataset of them, or a JSONL path.
    `eval_fn(example, generated_text) -> float`: scored on greedy generations from each validation example's
    prompt (prompt/completion: the prompt; chat: the conversation before its last assistant turn).
    A checkpoint folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
    (a LoRA one holds the adapter: `paperloop merge` writes a plain model folder from it).
    """

    def __init__(self, model: torch.nn.Module, config: SFTConfig, tokenizer, train_data, val_data=None,
                 eval_fn: Callable[[dict, str], float] | None = None, callbacks=(), stop_token_ids=None,
                 teacher: torch.nn.Module | None = None, teacher_tokenizer=None):
        if not isinstance(config, SFTConfig):
            raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
        if train_data is None:
            raise ValueError("SFTTrainer needs train_data")
        if teacher is None and config.distilling_changed:
            raise ConfigError(f"{', '.join(config.distilling_changed)}: set, but no teacher was given "
                              "(SFTTrainer(teacher=...))")
        if teacher is not None:
            check_same_vocabulary(model, teacher)
        self.config, self.tokenizer, self.eval_fn = config, tokenizer, eval_fn
        self.skipped: dict[str, list[tuple[int, str]]] = {}
        train = self.tokenize(train_data, "train_data")
        self.val_source = load_examples(val_data) if val_data is not None else None
        val = self.tokenize(self.val_source, "val_data") if val_data is not None else None
        if eval_fn is not None:
            if val is None:
                raise ValueError("eval_fn: scores generations on val_data, but no val_data was given")
            self._prompts = [generation_prompt(self.val_source[e.index], tokenizer, e.index, config.split_special_tokens)
                             for e in val]
        super().__init__(model, config, tokenizer, train_data=train, val_data=val, callbacks=callbacks,
                         stop_token_ids=stop_token_ids, teacher=teacher, teacher_tokenizer=teacher_tokenizer)
        self.divergence = divergence_fn(config.distill, top_k=config.distill_top_k, beta=config.distill_beta)
        self.lengths = [len(example) for example in train]
        self.check_positions(max(self.lengths + [len(e) for e in val or []]), "the longest example")
        if eval_fn is not None:
            self.check_positions(max(map(len, self._prompts)) + config.eval_max_new_tokens,
                                 "the longest validation prompt plus eval_max_new_tokens")
        self.compile_seconds = 0.0
        # dynamic=True: padded lengths and packed row counts vary per step; marking them dynamic up front
        # compiles once instead of once per shape. Generation keeps the uncompiled model.
        self._scoring_model = (torch.compile(self.model, dynamic=True, backend=COMPILE_BACKEND) if config.compile
                               else self.model)

    def tokenize(self, examples, name: str) -> list[TokenizedExample]:
        """`examples` (train_data or val_data, as `name` says) as masked token sequences; skips are counted in
        `self.skipped[name]` and logged. Override to change the mask of a paper's examples."""
        config = self.config
        kept, skipped = tokenize_examples(examples, self.tokenizer, config.max_length, config.train_prompt,
                                          config.split_special_tokens)
        self.skipped[name] = skipped
        if skipped:
            log.warning("%s: skipped %d of %d examples with nothing to train (first: example %d, %s)", name,
                        len(skipped), len(kept) + len(skipped), *skipped[0])
        truncated = sum(1 for example in kept if example.truncated)
        if truncated:
            log.info("%s: %d examples truncated to max_length=%d", name, truncated, config.max_length)
        if not kept:
            raise ValueError(f"{name}: none of its {len(skipped)} examples has a token to train")
        return kept

    def compute_fingerprints(self) -> dict[str, str]:
        """The tokenizer's, and the tokenized training set's: every example's ids and loss weights."""
        examples = digest(t.numpy().tobytes() for e in self.train_data
                          for t in (e.input_ids, e.target_tokens, e.weights))
        return {**super().compute_fingerprints(), "train_data": examples}

    # ---- the engine's named steps ------------------------------------------------------------------

    def sample_weights(self) -> torch.Tensor:
        return torch.tensor([example.num_trained for example in self.train_data], dtype=torch.float64)

    def make_plan(self) -> EpochPlan:
        """The one place the batch layout is decided: the plan cuts the steps and collates their rows."""
        c, weights = self.config, self.sample_weights()
        common = dict(world_size=self.world_size, rank=self.rank, seed=c.seed, shuffle=c.shuffle, weights=weights)
        lengths = [len(example) for example in self.train_data]
        if c.packing:
            # The micro-batch's token budget: batch_size full-length examples' worth of positions.
            rows = max(1, math.ceil(c.batch_size * c.max_length / c.row_length))
            return PackedPlan(lengths, self.pad_id, c.row_length, rows, c.grad_accum_steps, **common)
        if c.bucket_window:
            return BucketedPlan(lengths, self.pad_id, c.bucket_window, c.batch_size, c.grad_accum_steps, **common)
        return PaddedPlan(lengths, self.pad_id, c.batch_size, c.grad_accum_steps, **common)

    def collate(self, samples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        """Evaluation batches: one example per row, padded (training batches are the plan's)."""
        return pad_batch(samples, self.pad_id)

    def training_step(self, batch):
        """The mean loss over the micro-batch's trained tokens: the NLL, or with a teacher `lm.distill`'s mix of the
        NLL and the divergence from the teacher (`distill/kl`, `distill/nll` beside it)."""
        if self.teacher is not None:
            return distill_loss(self._scoring_model, self.teacher, batch, self.divergence, self.config.distill_weight)
        return cross_entropy(self.forward(batch, self._scoring_model).logprobs, batch)

    def train_step(self, step) -> dict:
        graphs = compiled_graphs() if self.config.compile else 0
        start = time.perf_counter()
        outputs = super().train_step(step)
        seconds = time.perf_counter() - start
        if self.teacher is not None:  # this process's mean over its micro-batches -> the step's, over every process
            keys, mine = ("distill/kl", "distill/nll"), sum(step.shares())  # this process's part of the step
            outputs.update(zip(keys, self.reduce_sum(torch.stack([outputs[k].float() * mine for k in keys])).unbind()))
        lengths = [[self.lengths[i] for i in indices.tolist()] for indices in step.micro_batches]
        positions = sum(self.plan.positions(ls) for ls in lengths)
        outputs["train/padding_fraction"] = 1.0 - sum(map(sum, lengths)) / positions
        if self.config.compile and compiled_graphs() != graphs:  # this step compiled: keep it out of the rate
            self.compile_seconds += seconds
            outputs["time/compile_s"] = self.compile_seconds
            log.info("step %d compiled the model in %.1f s (%.1f s in all)", self.state.global_step + 1, seconds,
                     self.compile_seconds)
        else:
            outputs["perf/tokens_per_s"] = step.weight / seconds
        return outputs

    # ---- validation ---------------------------------------------------------------------------------

    def validation_step(self, batch) -> dict:
        """`loss`: the NLL per trained token; `exact_match`: the fraction of examples whose every trained token
        is the argmax (what greedy decoding of the completion would reproduce)."""
        scores = self.forward(batch, greedy=True)
        weights_B_T = batch["weights"]
        exact_B = (scores.greedy | (weights_B_T == 0)).all(1)
        return {"loss": Weighted(-(scores.logprobs * weights_B_T).sum(), weights_B_T.sum()),
                "exact_match": exact_B.float().mean()}

    def validate(self) -> dict:
        """`val/loss` (per trained token), `val/perplexity`, `val/exact_match`; `val/score` with an eval_fn."""
        metrics = self.evaluate(self.val_data, "val")
        metrics["val/perplexity"] = math.exp(min(metrics["val/loss"], 700.0))
        if self.eval_fn is not None:
            metrics["val/score"] = self.score_generations()
        return metrics

    def score_generations(self) -> float:
        """Mean `eval_fn(example, text)` over greedy generations from every validation prompt."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = lockstep_eval_batches(len(self.val_data), self.config.batch_size, self.world_size, self.rank,
                                        lockstep=self.sharded)
        for indices, real in batches:  # sharded: as many generations on every process (each forward a collective)
            indices = indices.tolist()
            samples = self.generate([self._prompts[i] for i in indices], max_new_tokens=self.config.eval_max_new_tokens)
            for i, completion in zip(indices, samples.completions() if real else []):
                text = self.tokenizer.decode(completion, skip_special_tokens=True)
                index = self.val_data[i].index
                total += call_scorer(self.eval_fn, self.val_source[index], text, name="eval_fn",
                                     where=f"validation example {index} (generated {text!r:.80})")
        return float(self.reduce_sum(total)) / len(self.val_data)


def check_same_vocabulary(model, teacher) -> None:
    """Distilling a distribution needs one vocabulary: the teacher's output layer as wide as the student's."""
    widths = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (model, teacher)]
    if None not in widths and widths[0] != widths[1]:
        raise ValueError(f"teacher: its vocab_size is {widths[1]} and the student's {widths[0]}: distilling the "
                         "next-token distribution needs the same vocabulary (resize one: resize_token_embeddings)")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (it grows on every (re)compilation)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def generation_prompt(example: dict, tokenizer, index: int = 0, split_special_tokens: bool = False) -> list[int]:
    """The token ids a model continues from to answer `example`: a prompt/completion's prompt (with the
    tokenizer's BOS), or a chat rendered up to its last assistant turn with the generation prompt."""
    shape = example_shape(example, index)
    if shape == "prompt_completion":
        return prompt_ids(example["prompt"], tokenizer, split_special_tokens)
    if shape == "chat":
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return prompt_ids(messages[:last], tokenizer)
    raise ValueError("eval_fn: a plain-text example has no prompt to generate from; give prompt/completion or "
                     "chat examples as val_data")

"""paperloop.lm: language models — tokenized data and masks, data plans that pad or pack, the one forward, LoRA,
KV-cached sampling, the layer both language-model trainers stand on, and SFTTrainer.

    from paperloop.lm import SFTTrainer, SFTConfig                      # also `from paperloop`
    from paperloop.lm import tokenize_examples, show_mask, forward_logprobs, sample

- `data.py`: examples -> tokens with a loss mask -> padded or packed rows (first fit)
- `plans.py`: data plans over tokenized examples (padded, bucketed, packed by a token budget), each owning its layout
- `losses.py`: the one forward (`forward_logprobs`), per-token log-probs and entropy, cross-entropy
- `distill.py`: off-policy distillation (SFTTrainer with a teacher): the divergences by name, both models chunked
- `lora.py`: LoRA adapters through peft, their base folder, and `paperloop merge`
- `weights.py`: how a language model's weights are written into a checkpoint and read back (save_pretrained
  folders, LoRA adapters alone)
- `sampling.py`: KV-cached sampling from a generator the caller owns: one decode loop (`TurnSampler`), whose one
  turn is `sample`
- `modules.py`: model utilities (dropout off, a frozen copy, a weight checksum)
- `base.py`: `LMTrainer`, the shared layer (tokenizer and pad rule, LoRA, tokenizer in checkpoints, forward, generate)
- `sft.py`: `SFTTrainer` and `SFTConfig`
"""

from .base import LMConfig, LMTrainer, call_scorer, pad_token_id
from .data import TokenizedExample, first_fit, load_examples, pack_batch, pad_batch, prompt_ids, show_mask, \
    tokenize_example, tokenize_examples
from .lora import LoraSettings, merge_checkpoint
from .losses import TokenScores, chunked_scores, cross_entropy, forward_logprobs
from .plans import BucketedPlan, PackedPlan, PaddedPlan
from .sampling import Samples, TurnSampler, default_stop_token_ids, sample
from .sft import SFTConfig, SFTTrainer

__all__ = ["LMConfig", "LMTrainer", "call_scorer", "pad_token_id", "TokenizedExample", "first_fit", "load_examples",
           "pack_batch", "pad_batch", "prompt_ids", "show_mask", "tokenize_example", "tokenize_examples",
           "LoraSettings", "merge_checkpoint", "TokenScores", "chunked_scores", "cross_entropy", "forward_logprobs",
           "BucketedPlan", "PackedPlan", "PaddedPlan", "Samples", "TurnSampler", "default_stop_token_ids", "sample", "SFTConfig",
           "SFTTrainer"]

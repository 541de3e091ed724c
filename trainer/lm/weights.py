"""How a language model's weights go into a checkpoint and come back, for `LMTrainer.write_weights` and
`load_weights` (the engine knows no transformers nor peft):

- written: the model's own `save_pretrained` folder, so `AutoModelForCausalLM.from_pretrained(checkpoint)` loads it
  (a LoRA model: the trained adapter alone, `adapter_model.safetensors` and `adapter_config.json`; the frozen base is
  rebuilt, not saved), without the "Writing model shards" bar transformers draws at every save
  (`no_shard_progress_bar`);
- read back: the whole state (a tied weight stored once is not missing), or a LoRA model's adapter alone
  (`load_state_or_adapter`).
"""

from __future__ import annotations

import contextlib

import torch

from ..checkpoint import load_model_state

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what a peft (LoRA) model's save_pretrained writes: the adapter


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def load_state_or_adapter(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load `tensors` into `model`, or raise ValueError saying what does not fit: a peft model takes either its
    whole state or its adapter alone (what its checkpoints hold), any other its state with tied weights once."""
    if is_peft(model) and not set(tensors) <= set(model.state_dict()):
        return load_adapter(model, tensors)
    load_model_state(model, tensors)


def load_adapter(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The adapter `tensors` (named as peft saves them) into the peft `model`, or a ValueError naming a misfit."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"adapter weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"adapter weights do not fit the model ({key}: {tuple(value.shape)} vs "
                             f"{tuple(expected[key].shape)})")
    set_peft_model_state_dict(model, tensors)


@contextlib.contextmanager
def no_shard_progress_bar():
    """transformers draws a "Writing model shards" bar on stderr at every save, through our own progress bar;
    a checkpoint is not a step the user waits on, so it stays quiet (the user's setting is put back)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

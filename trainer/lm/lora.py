"""LoRA through `peft` (an optional extra: `pip install "paperloop[lora]"`): adapters train, the base stays frozen.

    config = SFTConfig(..., lora=LoraSettings(r=8, alpha=16))      # or RLConfig; or `lora: {r: 8}` in YAML
    paperloop merge runs/sft/checkpoints/step-000100 runs/sft/merged  # a plain transformers folder

A LoRA checkpoint holds the adapter only (`adapter_model.safetensors`, `adapter_config.json`); the frozen
base is rebuilt by the code that built it, as DESIGN says of frozen models. To merge, the adapter needs the
base's weights: `adapter_config.json` names the base folder. A base loaded from a local folder is named as
it is; a base built in memory (e.g. `tiny_causal_lm`) is written once to `output_dir/base_model`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..checkpoint import CheckpointError, no_shard_progress_bar, read_weights, temporary_dir, untied_missing, verify
from ..config import ConfigError

BASE_FOLDER = "base_model"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    # Llama-style attention projections; "all-linear" adapts every linear layer but the output head.
    target_modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    base_model: Optional[str] = None  # the base's folder for merging; None: the model's own, else output_dir/base_model

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: name at least one module (or 'all-linear')")


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("lora: is set in the config but peft is not installed; "
                          "pip install \"paperloop[lora]\"") from None
    return peft


def apply_lora(model: torch.nn.Module, settings: LoraSettings, output_dir: str | Path, write: bool = True):
    """`model` wrapped by peft with LoRA adapters (only they require grad). Unless the base is a local folder
    already, it is written to `output_dir/base_model` (by the process with `write`) so the adapter checkpoints
    can be merged later; a folder there holding other weights is an error (the adapter would be resumed or
    merged onto another base)."""
    peft = require_peft()
    base_path = settings.base_model or _local_folder(model)
    if base_path is None:
        base_path = Path(output_dir) / BASE_FOLDER
        if write:
            save_base_model(model, base_path)
    targets = "all-linear" if tuple(settings.target_modules) == ("all-linear",) else list(settings.target_modules)
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    # Set after wrapping: get_peft_model replaces it with the model's own name_or_path ("" when built in memory).
    wrapped.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return wrapped


def _local_folder(model) -> str | None:
    name = getattr(model, "name_or_path", "") or ""
    return name if name and (Path(name) / "config.json").is_file() else None


def save_base_model(model, folder: Path) -> None:
    """Write the frozen base once (atomically: a temporary folder renamed into place); if it is there
    already, check that it holds these very weights."""
    folder = Path(folder)
    if folder.exists():
        saved, own = read_weights(folder), model.state_dict()
        differs = untied_missing(own, saved) + [k for k in saved if k not in own or not torch.equal(saved[k], own[k])]
        if differs:
            raise ValueError(f"{folder}: holds another base model than this one ({differs[0]} differs); the "
                             "adapter checkpoints in this output_dir belong to that base. Build the same base "
                             "(same seed/config) or use another output_dir")
        return
    tmp = temporary_dir(folder)
    with no_shard_progress_bar():
        model.save_pretrained(tmp)
    os.rename(tmp, folder)


def merge_checkpoint(checkpoint: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Merge a LoRA checkpoint's adapter into its base and write a plain `transformers` folder to `out`
    (weights, config, and the checkpoint's tokenizer when it has one) that
    `AutoModelForCausalLM.from_pretrained(out)` loads without peft. `base`: the base model folder, by default
    the one `adapter_config.json` names."""
    from transformers import AutoModelForCausalLM

    peft = require_peft()
    checkpoint, out = Path(checkpoint), Path(out)
    verify(checkpoint)
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{checkpoint}: no {ADAPTER_CONFIG}, so not a LoRA checkpoint; a full checkpoint "
                              "loads with AutoModelForCausalLM.from_pretrained as it is")
    base = base or json.loads((checkpoint / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise CheckpointError(f"{checkpoint / ADAPTER_CONFIG}: its base model folder {base!r} is not there; pass "
                              "the base folder (paperloop merge CHECKPOINT OUT --base FOLDER)")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(checkpoint))
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    if (checkpoint / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out

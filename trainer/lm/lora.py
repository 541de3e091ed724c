"""LoRA through `peft` (an optional extra: `pip install "paperloop[lora]"`): adapters train, the base stays frozen.

    config = SFTConfig(..., lora=LoraSettings(r=8, alpha=16))      # or RLConfig; or `lora: {r: 8}` in YAML
    paperloop merge runs/sft/checkpoints/step-000100 runs/sft/merged  # a plain transformers folder

A LoRA checkpoint holds the adapter only (`adapter_model.safetensors`, `adapter_config.json`); the frozen
base is rebuilt by the code that built it, as DESIGN says of frozen models. To merge, the adapter needs the
base's weights: `adapter_config.json` names the base folder. A base loaded from a local folder is named as
it is; a base built in memory (e.g. `tiny_causal_lm`) is written once to `output_dir/base_model`.

A base is known by its content, not its path: every LoRA checkpoint records a checksum of the base's weights and
their dtype (the run's `lora_base` fingerprint, `base_fingerprint`), so a resume onto a base whose folder now holds
other weights is refused, and `merge` loads the base in the recorded dtype and refuses one whose checksum differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..checkpoint import STATE_JSON, CheckpointError, decode, read_weights, temporary_dir, untied_missing, verify
from ..config import ConfigError, check_types
from .weights import ADAPTER_WEIGHTS, no_shard_progress_bar

log = logging.getLogger(__name__)

BASE_FOLDER = "base_model"
ADAPTER_CONFIG = "adapter_config.json"
LORA_BASE = "lora_base"  # the fingerprint naming the base's weights in a LoRA checkpoint
# A module name as peft matches it in a list (a suffix of the module's dotted path); peft reads a *string* as a
# regular expression, which a crafted one can make backtrack for ever, so only names in a list are passed on.
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    # Llama-style attention projections; "all-linear" adapts every linear layer but the output head.
    target_modules: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    base_model: Optional[str] = None  # the base's folder for merging; None: the model's own, else output_dir/base_model

    def __post_init__(self):
        check_types(self, prefix="lora.")  # r=2.5, r="8", alpha=nan, a string target_modules: refused by name
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0 (the update is scaled by alpha / r), got {self.alpha}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: name at least one module (or 'all-linear')")
        if tuple(self.target_modules) != ("all-linear",):
            for name in self.target_modules:
                if not MODULE_NAME.fullmatch(name):
                    raise ConfigError(f"lora.target_modules: {name!r} is not a module name (letters, digits, _ "
                                      "and dots; patterns are not taken)")

    @classmethod
    def from_dict(cls, values: dict) -> "LoraSettings":
        """Settings from a mapping (a config's `lora: {...}`), with an unknown key named."""
        if not isinstance(values, dict):
            raise ConfigError(f"lora: must be a mapping of LoRA settings, got {values!r:.60}")
        known = set(cls.__dataclass_fields__)
        for key in values:
            if key not in known:
                raise ConfigError(f"lora.{key}: not a LoRA setting; the settings are {sorted(known)}")
        return cls(**values)


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
        save_base_model(model, base_path, write)  # every process checks a folder that is there; one writes
    wrapped = peft.get_peft_model(model, peft_config(settings))
    # Set after wrapping: get_peft_model replaces it with the model's own name_or_path ("" when built in memory).
    wrapped.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return wrapped


def _local_folder(model) -> str | None:
    name = getattr(model, "name_or_path", "") or ""
    return name if name and (Path(name) / "config.json").is_file() else None


def base_fingerprint(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """"<dtype>:<sha256>" of a base model's weights as they are in memory: each tensor of its state dict (name, dtype,
    shape, bytes), in name order; `dtype` is the model's (`model.dtype`), which `merge` loads the base in again."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the bytes, whatever the dtype (bf16 too)
    return f"{str(dtype).removeprefix('torch.')}:{digest.hexdigest()}"


def save_base_model(model, folder: Path, write: bool = True) -> None:
    """Write the frozen base once (atomically: a temporary folder renamed into place; only with `write`, the main
    process); if it is there already, check that it holds these very weights (every process: a mismatch must
    stop them all, not one while the others wait for it at their first collective)."""
    folder = Path(folder)
    if folder.exists():
        saved, own = read_weights(folder), model.state_dict()
        differs = untied_missing(own, saved) + [k for k in saved if k not in own or not torch.equal(saved[k], own[k])]
        if differs:
            raise ValueError(f"{folder}: holds another base model than this one ({differs[0]} differs); the "
                             "adapter checkpoints in this output_dir belong to that base. Build the same base "
                             "(same seed/config) or use another output_dir")
        return
    if not write:
        return
    tmp = None
    try:
        tmp = temporary_dir(folder)
        with no_shard_progress_bar():
            model.save_pretrained(tmp)
        os.rename(tmp, folder)
    except OSError as e:
        if tmp is not None:  # a full disk, say: leave no half-written base behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"output_dir: {folder.parent} cannot hold the LoRA base model folder ({e.strerror or e}); "
                          "choose a folder you can write to, with room for the model") from e


def merge_checkpoint(checkpoint: str | Path, out: str | Path, base: str | Path | None = None,
                     force: bool = False, report=log.warning) -> Path:
    """Merge a LoRA checkpoint's adapter into its base and write a plain `transformers` folder to `out`
    (weights, config, and the checkpoint's tokenizer when it has one) that
    `AutoModelForCausalLM.from_pretrained(out)` loads without peft. `base`: the base model folder, by default
    the one `adapter_config.json` names; it is loaded in the dtype the run trained it in and must hold the weights
    the adapter was trained on (the checksum the checkpoint records, `check_base`).

    What the checkpoint holds is data: the adapter is rebuilt from the run's own recorded LoRA settings (never
    from `adapter_config.json`'s, whose module patterns peft would run as regular expressions), the base and
    the tokenizer load from local files only and run no code shipped with them (`trust_remote_code=False`).
    `out` must be a new or empty folder (`force`: an existing folder is replaced), and never the checkpoint,
    the base or a folder holding either; the folder is written under a temporary name, read back and compared
    with the merged weights, then renamed into place. `report(message)` is told which base is loaded and why.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = require_peft()
    checkpoint, out = Path(checkpoint), Path(out)
    verify(checkpoint)
    settings = recorded_lora_settings(checkpoint)
    source = "given by --base" if base is not None else f"named by {checkpoint / ADAPTER_CONFIG}"
    base = Path(base or _named_base(checkpoint) or "")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{checkpoint / ADAPTER_CONFIG}: the base model folder ({source}) {str(base)!r} is not "
                              "there; pass the base folder (paperloop merge CHECKPOINT OUT --base FOLDER)")
    check_merge_target(out, checkpoint, base, force)
    recorded = recorded_base(checkpoint)
    report(f"merge: loading the base model from {base} ({source}): local files only, no code of its own")
    local = dict(trust_remote_code=False, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **local, **({} if recorded is None else
                                                                        {"dtype": recorded[0]}))
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, **local) \
            if (checkpoint / "tokenizer_config.json").is_file() else None
    except (OSError, ValueError) as e:  # transformers' refusal of remote code is a ValueError
        raise CheckpointError(f"{base} or {checkpoint}: cannot be loaded as a local model and tokenizer without "
                              f"running their own code ({str(e).splitlines()[0]})") from None
    check_base(model, base, checkpoint, recorded, report)
    wrapped = peft.get_peft_model(model, peft_config(settings))
    adapter = read_weights(checkpoint)  # adapter_model.safetensors, checked to fit below
    expected = set(peft.get_peft_model_state_dict(wrapped))
    if set(adapter) != expected:
        raise CheckpointError(f"{checkpoint / ADAPTER_WEIGHTS}: does not hold the adapter the run's settings build "
                              f"(missing {sorted(expected - set(adapter))[:3]}, unexpected "
                              f"{sorted(set(adapter) - expected)[:3]})")
    peft.set_peft_model_state_dict(wrapped, adapter)
    write_checked(wrapped.merge_and_unload(), tokenizer, out)
    return out


def recorded_base(checkpoint: Path) -> tuple[torch.dtype, str] | None:
    """(dtype, fingerprint) of the base the checkpoint's adapter was trained on, as its state records them; None for
    a checkpoint written before they were recorded."""
    fingerprints = _recorded(checkpoint, "fingerprints")
    value = fingerprints.get(LORA_BASE) if isinstance(fingerprints, dict) else None
    dtype = getattr(torch, value.split(":")[0], None) if isinstance(value, str) else None
    if value is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{checkpoint / STATE_JSON}: its {LORA_BASE} fingerprint {value!r:.40} is not one this "
                              "code writes ('<dtype>:<sha256>')")
    return dtype, value


def check_base(model, base: Path, checkpoint: Path, recorded: tuple[torch.dtype, str] | None, report) -> None:
    """The base loaded from `base` is the one the checkpoint's adapter was trained on (its fingerprint), or a
    CheckpointError naming the folder: a path is reused, an archived checkpoint outlives the base it named."""
    if recorded is None:
        report(f"merge: {checkpoint / STATE_JSON} records no checksum of its base (written before they were): "
               f"{base} is merged onto unchecked")
        return
    if base_fingerprint(model.state_dict(), recorded[0]) != recorded[1]:
        raise CheckpointError(f"{base}: does not hold the base model the adapter in {checkpoint} was trained on (the "
                              f"checksum of its weights differs from the one {checkpoint / STATE_JSON} records): the "
                              "folder holds other weights now? Pass the base the run trained on (--base FOLDER)")


def write_checked(model, tokenizer, out: Path) -> None:
    """`model` (and `tokenizer`) saved to `out` through a temporary folder: read back and compared with the
    model's own weights, then renamed into place (an existing `out` goes only once the new one is complete)."""
    tmp = temporary_dir(out)
    try:
        with no_shard_progress_bar():
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        written, own = read_weights(tmp), model.state_dict()
        if untied_missing(own, written) or any(not torch.equal(v, own[k]) for k, v in written.items()):
            raise CheckpointError(f"{out}: the weights read back differ from the merged model; nothing was written")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def peft_config(settings: LoraSettings):
    """peft's LoraConfig for our settings: module names always as a list (peft takes a string as a pattern)."""
    peft = require_peft()
    targets = "all-linear" if tuple(settings.target_modules) == ("all-linear",) else list(settings.target_modules)
    return peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                           target_modules=targets, task_type="CAUSAL_LM")


def _recorded(checkpoint: Path, key: str):
    """The entry `key` of the checkpoint's state (its JSON alone, no tensors), or None when it cannot be read."""
    try:
        return decode(json.loads((checkpoint / STATE_JSON).read_text()).get(key), {})
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        return None


def recorded_lora_settings(checkpoint: Path) -> LoraSettings:
    """The LoRA settings the run that wrote `checkpoint` recorded in its state (checked like any config)."""
    config = _recorded(checkpoint, "config")
    values = config.get("lora") if isinstance(config, dict) else None
    if not isinstance(values, dict):
        raise CheckpointError(f"{checkpoint / STATE_JSON}: records no LoRA settings, so this is not a paperloop LoRA "
                              "checkpoint (a full checkpoint loads with AutoModelForCausalLM.from_pretrained as it is)")
    try:
        return LoraSettings.from_dict(values)
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint / STATE_JSON}: its LoRA settings are not valid: {e}") from None


def _named_base(checkpoint: Path) -> str | None:
    try:
        named = json.loads((checkpoint / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return named if isinstance(named, str) and named else None


def check_merge_target(out: Path, checkpoint: Path, base: Path, force: bool) -> None:
    """Refuse an `out` that would lose data: a file, a non-empty folder (unless `force`), or the checkpoint or
    the base (or a folder holding either, or inside either), compared as resolved paths."""
    target = out.resolve()
    for name, folder in (("the checkpoint", checkpoint.resolve()), ("the adapter's base model", base.resolve())):
        if target == folder or folder.is_relative_to(target) or target.is_relative_to(folder):
            raise CheckpointError(f"{out}: is (or holds, or lies in) {name} {folder}; merging there would destroy it. "
                                  "Choose a new folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CheckpointError(f"{out}: exists and is not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out}: is a folder with files in it; choose a new or empty folder (or --force to "
                              "replace it)")

"""Run configuration: frozen dataclasses filled from YAML and `key=value` overrides by OmegaConf.

    cfg = load_config(TrainerConfig, "papers/mnist1d/config.yaml", ["lr=3e-4", "max_epochs=5"])

A paper extends `TrainerConfig` by subclassing it (a frozen dataclass too), so one flat set of keys
holds both the engine's and the paper's settings. An unknown key, a value of the wrong type or an
out-of-range value raises `ConfigError`, whose message starts with the key: types are checked
against the dataclass annotations (`check_types`), for a config built from YAML and overrides and
for one constructed directly alike.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import math
import numbers
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

C = TypeVar("C")


SCHEDULES = ("constant", "linear", "cosine", "cosine_with_min_lr")  # the config's lr_scheduler names


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message starts with the key."""


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: Optional[int] = None  # passes over train_data; None: 1, or as many as max_steps needs when set
    max_steps: Optional[int] = None  # loop steps; with max_epochs set too, whichever comes first
    batch_size: int = 32  # per process and per micro-batch
    lr: float = 1e-3  # learning rate of the default AdamW
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    seed: int = 0  # seeds python, numpy, torch and the data order
    output_dir: str = "runs/default"  # checkpoints, logs and results; one run at a time (locked)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: Optional[float] = None  # clip the gradient's total norm to this; null: no clipping
    precision: str = "32"  # "32" or "bf16"
    strategy: str = "ddp"  # several processes: "ddp" (a full copy each) or "fsdp" (FSDP2: weights, grads, Adam sharded)
    shuffle: bool = True  # a new seeded order of train_data every epoch
    val_every: Optional[int] = None  # epochs; None: every epoch when val_data is given; 0: never
    val_every_steps: Optional[int] = None  # loop steps (an RL step holds several updates), in addition to val_every
    log_every_steps: int = 50  # loop steps between logged training metrics (optim/grad_norm is computed on these)
    checkpoint_every_steps: Optional[int] = None  # installs a ModelCheckpoint when none is attached
    async_checkpoint: bool = False  # training waits only for a copy to CPU memory; a thread writes the checkpoint
    time_limit_s: Optional[float] = None  # checkpoint and stop after this much wall time; the same command continues
    early_stopping_patience: Optional[int] = None  # installs an EarlyStopping when none is attached
    early_stopping_monitor: str = "val/loss"  # the metric early_stopping_patience watches
    early_stopping_mode: str = "min"  # "min" or "max": which way is better
    lr_scheduler: str = "constant"  # constant | linear | cosine | cosine_with_min_lr (transformers.get_scheduler)
    warmup_steps: int = 0  # optimizer updates of linear warmup from 0 to lr
    warmup_ratio: float = 0.0  # or warmup as a fraction of all updates (not both)
    min_lr_ratio: float = 0.0  # cosine_with_min_lr: the floor, as a fraction of lr

    # Keys a resume may change: how long the run goes on, and what it logs, checkpoints and validates. Any other
    # key with another value than the checkpoint's is refused (lr and the schedule: taken from the checkpoint),
    # since the resumed run would no longer be the one that was checkpointed. A subclass extends the tuple.
    resume_may_change: ClassVar[tuple[str, ...]] = (
        "max_epochs", "max_steps", "output_dir", "val_every", "val_every_steps", "log_every_steps",
        "checkpoint_every_steps", "async_checkpoint", "strategy", "time_limit_s", "early_stopping_patience",
        "early_stopping_monitor", "early_stopping_mode")

    def __post_init__(self):
        check_types(self)
        _check_range(self, positive=("batch_size", "grad_accum_steps", "log_every_steps"),
                     positive_or_none=("max_epochs", "max_steps", "val_every_steps", "checkpoint_every_steps",
                                       "time_limit_s", "early_stopping_patience", "max_grad_norm"),
                     non_negative=("lr", "weight_decay", "warmup_steps", "warmup_ratio", "min_lr_ratio"))
        if not 0 <= self.seed < 2**32:  # numpy's global seed is 32 bits: a wider one would fail later, naming nothing
            raise ConfigError(f"seed: must be in [0, 2**32 - 1], got {self.seed}")
        if self.lr_scheduler not in SCHEDULES:
            raise ConfigError(f"lr_scheduler: must be one of {', '.join(SCHEDULES)}, got {self.lr_scheduler!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError(f"warmup_ratio: set to {self.warmup_ratio} with warmup_steps={self.warmup_steps}; "
                              "set one of them")
        if self.warmup_ratio >= 1 or self.min_lr_ratio > 1:
            raise ConfigError(f"{'warmup_ratio' if self.warmup_ratio >= 1 else 'min_lr_ratio'}: must be a fraction "
                              "below 1")
        if self.val_every is not None and self.val_every < 0:
            raise ConfigError(f"val_every: must be >= 0 (0 turns validation off), got {self.val_every}")
        if self.precision not in ("32", "bf16"):
            raise ConfigError(f"precision: must be '32' or 'bf16', got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy: must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.early_stopping_mode not in ("min", "max"):
            raise ConfigError(f"early_stopping_mode: must be 'min' or 'max', got {self.early_stopping_mode!r}")

    def epoch_limit(self) -> Optional[int]:
        """The epochs the run may take: max_epochs, else 1 unless max_steps alone decides (None)."""
        if self.max_epochs is not None:
            return self.max_epochs
        return None if self.max_steps is not None else 1


# ---------------------------------------------------------------------------------------------
# Types: the dataclass annotations are the schema. One checker for every field of every config
# class (a paper's subclass included), so a key added later is checked without code of its own.


def check_types(cfg, prefix: str = "") -> None:
    """Check every field of the dataclass `cfg` against its annotation; raise ConfigError starting
    with the first key that does not fit (after `prefix`, for a config nested in another: "lora.").
    An int where a float is expected becomes a float and a list where a tuple is expected a tuple
    (what OmegaConf does for YAML and overrides)."""
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), _hints(type(cfg))[f.name]
        if not _fits(value, hint):
            raise ConfigError(f"{prefix}{f.name}: must be {describe_type(hint)}, got {value!r} "
                              f"({type(value).__name__})")
        object.__setattr__(cfg, f.name, _normalized(value, hint))


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:  # True/False only: 0, 1 or "no" for a flag is a mistake, not a choice
        return isinstance(value, bool)
    if hint is int:  # and a bool is not an int here, whatever Python says
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:  # no NaN or inf: no engine setting means anything by them
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:  # Tuple[int, str]: fixed length
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        key, val = args or (typing.Any, typing.Any)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, val) for k, v in value.items())
    return isinstance(value, origin or hint)


def _normalized(value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return next((_normalized(value, arm) for arm in args if _fits(value, arm)), value)
    if hint is float or hint is int:
        return hint(value)  # numpy scalars and ints-for-floats become plain Python numbers
    if (origin is tuple or hint is tuple) and isinstance(value, list):
        return tuple(value)
    return value


def describe_type(hint) -> str:
    """The annotation in words, as an error message or `--help` says it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arm) for arm in args)
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    if origin in (tuple, list) or hint in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "a list of " + ", ".join(describe_type(a) for a in args)
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return f"a {getattr(hint, '__name__', hint)}"


def _plural(hint) -> str:
    plural = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}
    return plural.get(hint, describe_type(hint))


def _check_range(cfg, positive=(), positive_or_none=(), non_negative=()):
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(cfg, key)}")
    for key in positive_or_none:
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0 or null, got {getattr(cfg, key)}")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {getattr(cfg, key)}")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build `cls` from its defaults, then the YAML file at `path`, then `key=value` overrides."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{item or repr(item)}: an override must look like key=value")
    try:
        file = OmegaConf.load(path) if path is not None else OmegaConf.create()
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a readable YAML config ({' '.join(str(e).split())[:200]})") from None
    if not OmegaConf.is_dict(file):
        raise ConfigError(f"{path}: a config file maps keys to values; this one holds a "
                          f"{'list' if OmegaConf.is_list(file) else type(file).__name__}")
    try:
        sources = [file, OmegaConf.from_dotlist(list(overrides))]
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), *sources))
    except OmegaConfBaseException as e:
        if getattr(e, "full_key", None):
            raise ConfigError(_named_error(cls, sources, e.full_key, e)) from None
        raise ConfigError(_unnamed_error(cls, sources, e)) from None


def _named_error(cls, sources, key: str, error: Exception) -> str:
    """OmegaConf's words for a value that does not fit a key of `cls` ("Invalid value assigned: str is not a
    ListConfig"), said as every other config error says it: what the key must be and what it got. One value where a
    list goes (`models=cnn`) is tried as a list: the config's own check then names the values it takes, or, when the
    list would do, the message says to write it so (`models=[cnn]`), beside the default. An unknown key keeps
    OmegaConf's message, which names it."""
    hint = _hints(cls).get(key)
    holding = [source for source in sources if key in source]
    if hint is None or not holding:
        return f"{key}: {str(error).splitlines()[0]}"
    value = OmegaConf.to_container(holding[-1])[key]
    message = f"{key}: must be {describe_type(hint)}, got {value!r}"
    takes_list = typing.get_origin(hint) in (tuple, list) or hint in (tuple, list)
    if isinstance(value, (list, tuple, dict)) or not takes_list:
        return message
    as_list = [OmegaConf.merge(source, {key: [value]}) if key in source else source for source in sources]
    try:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), *as_list))
    except ConfigError as e:
        return str(e) if str(e).startswith(f"{key}: ") else message
    except (OmegaConfBaseException, ValueError, TypeError):
        return message
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    shown = f" (the default: {key}=[{','.join(map(_as_yaml, default))}])" if isinstance(default, (list, tuple)) else ""
    return f"{message}: write {key}=[{_as_yaml(value)}]{shown}"


def _as_yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _unnamed_error(cls, sources, error: Exception) -> str:
    """OmegaConf names no key for a bad list item (`widths=[8,2.5]`): find it by merging one key
    at a time, and say what it must be."""
    for source in sources:
        for key in source:
            try:
                OmegaConf.merge(OmegaConf.structured(cls), {key: source[key]})
            except OmegaConfBaseException:
                value = OmegaConf.to_container(source)[key]
                return f"{key}: must be {describe_type(_hints(cls)[key])}, got {value!r}"
    return f"config: {str(error).splitlines()[0]}"


def describe_keys(cls, path: str | Path | None = None) -> list[tuple[str, str, object, str]]:
    """(key, type in words, value, comment) for every key of `cls`, in field order: the value the YAML
    file at `path` gives it (else its default), and the comment beside it in that file (else the one
    beside the field in the class's source)."""
    cfg = load_config(cls, path)
    comments = _source_comments(cls)
    if path is not None:
        comments.update(_yaml_comments(Path(path).read_text()))
    return [(f.name, describe_type(_hints(cls)[f.name]), getattr(cfg, f.name), comments.get(f.name, ""))
            for f in dataclasses.fields(cls)]


def _source_comments(cls) -> dict[str, str]:
    """Field -> the comment ending its line in the class source; Python's tokenizer finds the
    comments, so a '#' inside a string default is not taken for one."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in a REPL: no source to read
            continue
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        by_line = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
        for number, line in enumerate(source.splitlines(), 1):
            if (match := re.match(r"\s+(\w+)\s*:", line)) and number in by_line:
                comments[match[1]] = by_line[number]
    return comments


def _yaml_comments(text: str) -> dict[str, str]:
    """Top-level key -> the `# comment` ending its line in a YAML file."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^(\w+)\s*:[^\n]*? #([^\n]*)$", text, re.MULTILINE)}


def config_to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

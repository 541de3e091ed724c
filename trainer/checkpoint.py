"""Checkpoint files: crash-safe, verifiable, and free of pickle.

A checkpoint is one directory:

    step-000120/
      model.safetensors          weights (a `transformers` model writes its own save_pretrained files,
      config.json                so `from_pretrained` loads the directory as it is)
      trainer_state.json         everything else, as JSON: counters, histories, data position, RNG,
      trainer_tensors.safetensors  optimizer, scheduler, callbacks; tensors in this file, by name
      config.yaml                the resolved run config, for people
      manifest.json              size and sha256 of every file above

It is written under a temporary name beside its final one, every file fsynced, the manifest written
last, then renamed into place, and only then appended to `checkpoints.jsonl` in the same folder:
a crash at any instant leaves every earlier checkpoint whole. Loading reads only JSON and
safetensors, so a file replaced by a crafted pickle fails to parse and runs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

log = logging.getLogger(__name__)

FORMAT = "paperloop-checkpoint/1"
MANIFEST = "manifest.json"
INDEX = "checkpoints.jsonl"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_tensors.safetensors"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model; names the file."""


# ---------------------------------------------------------------------------------------------
# A nested state (dicts, lists, tuples, scalars, tensors, numpy arrays) <-> JSON + named tensors.
# Tuples and non-string dict keys are tagged so the tree comes back exactly as it was
# (python's RNG state is a tuple; optimizer state is keyed by int).


def encode(obj, tensors: dict[str, torch.Tensor], path: str = "state"):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()  # written out before training goes on: no copy
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{path}.key{i}"), encode(v, tensors, f"{path}.{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"{path}: cannot checkpoint a {type(obj).__name__}; state_dict() values must be "
                    "tensors, arrays, numbers, strings, None, or lists/tuples/dicts of them")


def decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def save_state(directory: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(state, tensors)
    (directory / STATE_JSON).write_text(json.dumps(tree))
    save_file(tensors, str(directory / STATE_TENSORS))


def load_state(directory: Path) -> dict:
    try:
        tree = json.loads((directory / STATE_JSON).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / STATE_JSON}: not valid JSON ({e})") from None
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_TENSORS}: not a valid safetensors file ({e})") from None
    try:
        return decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_JSON}: does not match {STATE_TENSORS} ({e})") from None


# ---------------------------------------------------------------------------------------------
# Weights


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    transformers = sys.modules.get("transformers")  # a PreTrainedModel means it is already imported
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        model.save_pretrained(directory)
    else:
        save_model(model, str(directory / WEIGHTS))  # drops tied duplicates, as load_weights expects


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights in `directory` (one safetensors file, or the shards its index names), by name."""
    index = directory / WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS]
    loaded: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            loaded.update(load_file(str(directory / name)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{directory / name}: not a valid safetensors file ({e})") from None
    return loaded


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load `tensors` into `model`, or raise ValueError saying what does not fit. Tied weights are
    stored once, so a missing key is fine when it shares memory with a loaded one."""
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"weights do not fit the model ({e})") from None
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in tensors if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


# ---------------------------------------------------------------------------------------------
# Atomic commit, verification, and finding the newest good checkpoint


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)  # hashlib releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def temporary_dir(final: Path) -> Path:
    """An empty folder beside `final` to write into; same filesystem, so the rename is atomic."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path, record: dict) -> None:
    """Seal `tmp` with a manifest, rename it to `final`, and append it to the folder's index."""
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor() as pool:  # hashing (CPU) overlaps the fsyncs (disk)
        digests = list(pool.map(_sha256, paths))
        for p in paths:
            _fsync(p)
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)}
    _write_durably(tmp / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1))
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    entry = {"event": "saved", "path": final.name, "time": time.time(), **record}
    _write_durably(final.parent / INDEX, json.dumps(entry) + "\n", mode="a")


def record_removal(folder: Path, name: str) -> None:
    shutil.rmtree(folder / name, ignore_errors=True)
    _write_durably(folder / INDEX, json.dumps({"event": "removed", "path": name, "time": time.time()}) + "\n",
                   mode="a")


def verify(directory: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint was never committed") from None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_path}: not a valid manifest") from None
    if manifest.get("format") != FORMAT or STATE_JSON not in files:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest")
    for name, expected in files.items():
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{manifest_path}: names a file outside the checkpoint ({name})")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != {expected['size']} in the manifest")
    with ThreadPoolExecutor() as pool:
        digests = pool.map(_sha256, [directory / name for name in files])
        for (name, expected), digest in zip(files.items(), digests):
            if digest != expected["sha256"]:
                raise CheckpointError(f"{directory / name}: sha256 differs from the manifest (corrupted or modified)")


def committed(folder: Path) -> list[Path]:
    """Committed checkpoints in `folder`, newest first, from its append-only index."""
    index = folder / INDEX
    if not index.exists():
        return []
    order: list[str] = []
    for line in index.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a torn last line from a crash while appending
            continue
        if entry.get("path") in order:
            order.remove(entry["path"])
        if entry.get("event") == "saved":
            order.append(entry["path"])
    return [folder / name for name in reversed(order)]


def find_latest(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest committed checkpoint that verifies, and the newer ones skipped with the reason."""
    skipped = []
    for path in committed(folder):
        try:
            verify(path)
            return path, skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, skipped


# ---------------------------------------------------------------------------------------------
# A trainer's state dict <-> a checkpoint folder


def write(path: Path, state: dict, model: torch.nn.Module, config_yaml: str, record: dict, artifacts=None) -> None:
    """Write `state` (a trainer's `state_dict()`) as the checkpoint `path`, atomically.

    The "model" component is written from `model` itself, so a `transformers` model goes through
    `save_pretrained` and the folder loads with `from_pretrained`; everything else goes through the
    JSON + safetensors codec. `artifacts(folder)` may add files for people and tools (a tokenizer);
    they are sealed in the manifest like the rest and never read back. `record` is added to the
    folder's index entry."""
    if path.exists():
        raise FileExistsError(f"{path}: a checkpoint there exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(path)
    save_weights(model, tmp)
    save_state(tmp, {k: v for k, v in state.items() if k != "model"})
    (tmp / "config.yaml").write_text(config_yaml)  # for people: never read back
    if artifacts is not None:
        artifacts(tmp)
    commit(tmp, path, record)


def read(path: Path) -> dict:
    """The state dict a checkpoint holds, "model" included, after verifying every file."""
    verify(path)
    state = load_state(path)
    state["model"] = read_weights(path)
    return state

"""Checkpoint files: crash-safe, verifiable, and free of pickle.

A checkpoint is one directory:

    step-000120/
      model.safetensors          weights, as the trainer's `write_weights` writes them (a model with its own
      config.json                `save_pretrained` writes its folder, so its own loader reads the directory)
      trainer_state.json         everything else, as JSON: counters, histories, data position, RNG,
      trainer_tensors.safetensors  optimizer, scheduler, callbacks; tensors in this file, by name
      config.yaml                the resolved run config, for people
      manifest.json              size and sha256 of every file above, and which of them hold the weights

It is written under a temporary name beside its final one, every file fsynced, the manifest written
last, then renamed into place, and only then appended to `checkpoints.jsonl` in the same folder:
a crash at any instant leaves every earlier checkpoint whole. Loading reads only JSON and
safetensors, so a file replaced by a crafted pickle fails to parse and runs nothing.

What a checkpoint says is data. The manifest and every index line are checked against their schema
before use (a garbled one is skipped by `read_latest`, or a CheckpointError naming the file); a name
read from checkpoint data must be a plain entry of the checkpoint folder; each index entry carries
the id of the run that wrote it, and `record_removal` deletes only checkpoints of the calling run.
What it costs to verify is bounded before anything is hashed (`verify`): a resume hashes only the files it reads,
each sealed file must be a regular file of its recorded size (a safetensors file: the size its header declares),
and the tensors at most what the run's checkpoint can hold. The next save cleans up what interrupted writes left
(`remove_leftovers`).

A write is two halves: `take` (at the step boundary: the temporary folder, config.yaml and artifacts)
and `finish` (weights and state files, manifest, rename, index). The weights are written by a function the
trainer hands over (`BaseTrainer.write_weights`, bound to what it writes): this module knows no model
format beyond `save_weights`, the default. An async save (`TrainerConfig.async_checkpoint`) takes a `copy`
of the state to CPU memory, with a writer bound to a CPU copy of the model, and finishes it in a
background thread while training goes on (trainer/resume.py).
"""

from __future__ import annotations

import copy as copying
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from .lock import pid_alive

log = logging.getLogger(__name__)

FORMAT = "paperloop-checkpoint/1"
MANIFEST = "manifest.json"
INDEX = "checkpoints.jsonl"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_tensors.safetensors"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")  # temporary_dir's names
SHA256 = re.compile(r"[0-9a-f]{64}")
# What a checkpoint's files can hold, checked before hashing (`verify`): a manifest lists names and digests; the
# state's JSON holds counters, histories and RNG states (tensors go to their own file); safetensors caps its header.
MANIFEST_LIMIT = 16 << 20
METADATA_LIMIT = 1 << 30
SAFETENSORS_HEADER_LIMIT = 100_000_000


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
    except RecursionError:  # a crafted file of 100,000 nested lists: never a state this code wrote
        raise CheckpointError(f"{directory / STATE_JSON}: nested too deeply to be a trainer state") from None
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_TENSORS}: not a valid safetensors file ({e})") from None
    try:
        return decode(tree, tensors)
    except RecursionError:
        raise CheckpointError(f"{directory / STATE_JSON}: nested too deeply to be a trainer state") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / STATE_JSON}: does not match {STATE_TENSORS} ({e})") from None


# ---------------------------------------------------------------------------------------------
# Weights


def save_weights(model: torch.nn.Module, directory: Path, state_dict: dict | None = None) -> None:
    """`BaseTrainer.write_weights`' default. A model that writes itself (it has `save_pretrained(directory)`, as
    Hugging Face models do) writes its own folder, so its own loader reads the checkpoint as it is; any other
    writes one safetensors file, tied weights once (as `load_model_state` expects). `state_dict`: the weights to
    write instead of the model's own (FSDP's, gathered whole), which only a model that writes itself takes."""
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(directory, **({} if state_dict is None else {"state_dict": state_dict}))
    elif state_dict is not None:
        raise TypeError(f"{type(model).__name__}: gathered weights are written by a model's own save_pretrained only")
    else:
        save_model(model, str(directory / WEIGHTS))


def detached(obj):
    """A state dict with every tensor cloned to CPU memory and every container and array copied: what an
    async save writes while training changes the originals (an optimizer step works in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, tuple):
        return tuple(detached(v) for v in obj)
    if isinstance(obj, list):
        return [detached(v) for v in obj]
    if isinstance(obj, dict):
        return {k: detached(v) for k, v in obj.items()}
    return obj  # numbers, strings, None: immutable


def cpu_copy(model: torch.nn.Module, omit_frozen: bool = False) -> torch.nn.Module:
    """A copy of `model` to write while the original trains on: every parameter and every buffer cloned to CPU
    memory, the rest of the object (the model's config, an adapter's settings) deep-copied, so a weights writer given
    the copy writes the same files as given the model at this moment. One clone per tensor object: tied weights stay
    tied, so the same duplicates are dropped.

    Frozen parameters are cloned too: frozen says no optimizer writes them, not that nothing does (an EMA teacher or
    a target network updated in place after each step would otherwise be written from a later step). With
    `omit_frozen` (the caller's writer writes no frozen parameter: a LoRA checkpoint holds the adapter alone) they
    are left out, as empty meta tensors: no copy of a base model that can be most of the memory, and a writer that
    reads one after all fails ("Cannot copy out of meta tensor") instead of writing another step's values."""
    memo: dict[int, torch.Tensor] = {}
    for t in model.parameters():
        omitted = omit_frozen and not t.requires_grad
        clone = torch.empty_like(t, device="meta") if omitted else t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(clone, requires_grad=t.requires_grad)
    for t in model.buffers():  # running statistics change in training whether or not they require grad
        memo.setdefault(id(t), t.detach().to("cpu", copy=True))
    return copying.deepcopy(model, memo)


def weight_files(directory: Path) -> list[str]:
    """The safetensors files holding the weights in `directory`. In a checkpoint, only files its manifest seals: those
    a sealed sharded-save index names, else those its weights writer wrote, as the manifest records them (one
    written before the record: every safetensors file it seals but the trainer's state). Elsewhere (a
    `save_pretrained` folder): those its index names, else model.safetensors."""
    index = directory / WEIGHTS_INDEX
    if not (directory / MANIFEST).exists():
        return _indexed_files(index) if index.exists() else [WEIGHTS]
    manifest = checked_manifest(directory)
    files = manifest["files"]
    if WEIGHTS_INDEX in files:
        names = _indexed_files(index)
    elif "weights" in manifest:
        names = manifest["weights"]
    else:
        names = [name for name in files if name.endswith(".safetensors") and name != STATE_TENSORS]
    if unsealed := [name for name in names if name not in files]:
        raise CheckpointError(f"{index}: names {unsealed[0]}, which {directory / MANIFEST} does not seal")
    return names


def read_back_files(directory: Path) -> list[str]:
    """The files of the checkpoint `directory` that a resume reads: the state's two, the weights and their index.
    The rest (config.yaml, a tokenizer, a model's config.json) is for people and tools, never read back."""
    sealed = read_manifest(directory)
    return [STATE_JSON, STATE_TENSORS, *([WEIGHTS_INDEX] if WEIGHTS_INDEX in sealed else []), *weight_files(directory)]


def _indexed_files(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and not _outside(f) for f in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid index of weight files (a 'weight_map' of names in the checkpoint)")
    return sorted(set(weight_map.values()))


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights in `directory` (the files `weight_files` names), by name."""
    loaded: dict[str, torch.Tensor] = {}
    for name in weight_files(directory):
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
    missing = untied_missing(model.state_dict(), tensors)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def untied_missing(own: dict[str, torch.Tensor], present) -> list[str]:
    """Keys of the state dict `own` that `present` lacks and that share no memory with a key it has:
    tied weights are stored once, so only these are really missing."""
    present_ptrs = {own[k].data_ptr() for k in present if k in own}
    return [k for k in own if k not in present and own[k].data_ptr() not in present_ptrs]


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


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def temporary_dir(final: Path) -> Path:
    """An empty folder beside `final` to write into; same filesystem, so the rename is atomic."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path, record: dict, *, run_id: str, weights: list[str] | None = None) -> None:
    """Seal `tmp` with a manifest, rename it to `final`, and append it to the folder's index as
    written by `run_id` (only that run may remove it). `weights`: the files holding the weights, recorded
    in the manifest for `read_weights`."""
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor() as pool:  # hashing (CPU) overlaps the fsyncs (disk)
        digests = list(pool.map(_sha256, paths))
        for p in paths:
            _fsync(p)
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)}
    # The run id is in the manifest too: a folder renamed into place whose index line never made it
    # (a kill in between) is still known to be this run's, so this run may clean it up.
    manifest = {"format": FORMAT, "run_id": run_id, "files": files, **({} if weights is None else {"weights": weights})}
    _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _append_index(final.parent, {"event": "saved", "path": final.name, "time": time.time(), **record, "run_id": run_id})


def _append_index(folder: Path, entry: dict) -> None:
    """One line at the end of the index; on a line of its own even after a torn append."""
    with open(folder / INDEX, "a+b") as f:  # appends go to the end whatever the read position
        end = f.seek(0, os.SEEK_END)
        torn = False
        if end:
            f.seek(end - 1)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(entry).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# What checkpoint data may name. A name read from an index line or from a callback's state is data:
# it may only ever mean a plain entry of the checkpoint folder it was read for, and a run removes
# only what its own index entries say it wrote.


def name_problem(name) -> str | None:
    """Why `name` is not a plain entry of a checkpoint folder, or None when it is one."""
    if not isinstance(name, str) or not name:
        return f"not a non-empty string but {name!r}"
    if any(sep in name for sep in ("/", "\\", "\0")):
        return "contains a path separator (an absolute path, or a path into another folder)"
    if name.startswith("."):
        return "starts with '.' ('.', '..', or a hidden or temporary name)"
    return None


def record_removal(folder: Path, name: str, *, run_id: str) -> bool:
    """Remove checkpoint `name` from `folder` and record it in the index, if `run_id` wrote it;
    otherwise leave everything as it is and log why. True when it is gone."""
    latest = index_events(folder, warn=False).get(name) if name_problem(name) is None else None
    if latest is not None and latest["event"] == "removed" and latest.get("run_id") == run_id:
        return True  # this run removed it already (a resumed run's list predates that removal)
    why = _removal_refusal(folder, name, run_id, latest)
    if why is not None:
        log.warning("not removing checkpoint %r from %s: %s", name, folder, why)
        return False
    shutil.rmtree(folder / name, ignore_errors=True)
    _append_index(folder, {"event": "removed", "path": name, "time": time.time(), "run_id": run_id})
    return True


def _removal_refusal(folder: Path, name, run_id: str, latest: dict | None) -> str | None:
    if (why := name_problem(name)) is not None:
        return why
    if (folder / name).is_symlink():
        return "it is a symbolic link"
    if latest is None or latest["event"] != "saved":
        return f"{folder / INDEX} holds no saved checkpoint of that name"
    if latest.get("run_id") != run_id:
        return f"it was written by another run (run id {latest.get('run_id')}, this run is {run_id})"
    return None


def remove_leftovers(folder: Path, run_id: str) -> list[str]:
    """Remove what interrupted writes left in `folder`, log each, and return their names:
    - `.NAME.tmp-PID` folders whose writer is not running (or is this process: nothing of ours is in
      flight when a save begins, as an async one is committed before the next is taken, and in a
      container a restarted run may get its predecessor's pid);
    - orphans: checkpoints renamed into place whose index line was never appended (a kill in
      between), told apart from any other folder by this run's id in their manifest. An orphan of
      another run, or an unknown folder, is left alone: a run deletes only what it wrote.
    """
    if not folder.is_dir():
        return []
    saved = read_index(folder, warn=False)
    removed = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if match := TEMPORARY.fullmatch(entry.name):
            pid = int(match["pid"])
            if pid != os.getpid() and pid_alive(pid):
                continue
            why = f"an unfinished checkpoint write by pid {pid}, which is no longer writing"
        elif entry.name not in saved and _manifest_run_id(entry) == run_id:
            why = "a checkpoint of this run renamed into place but never indexed (killed in between)"
        else:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed %s: %s", entry, why)
        removed.append(entry.name)
    return removed


def _manifest_run_id(directory: Path) -> str | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return manifest.get("run_id") if isinstance(manifest, dict) else None


# ---------------------------------------------------------------------------------------------
# Reading: the index, manifests, and the newest good checkpoint. Everything read is checked against
# its schema first, so a garbled file is a reason to skip (or a CheckpointError naming it), never a
# KeyError from deep inside.


def read_index(folder: Path, warn: bool = True) -> dict[str, dict]:
    """The checkpoints `folder`'s index holds as saved (and not removed since): name -> its "saved"
    entry, oldest first."""
    return {name: e for name, e in index_events(folder, warn).items() if e["event"] == "saved"}


def index_events(folder: Path, warn: bool = True) -> dict[str, dict]:
    """Each name's latest index entry ("saved" or "removed"), ordered by when that entry was made.
    A line that is not an entry is skipped, with a warning naming it when `warn`. One pass,
    constant work per line."""
    latest: dict[str, dict] = {}
    problems: list[str] = []
    try:
        f = open(folder / INDEX, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return latest
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry, why = None, "not JSON (a torn append?)"
            else:
                why = _index_entry_problem(entry)
            if why is not None:
                problems.append(f"line {number}: {why}")
                continue
            latest.pop(entry["path"], None)  # its newest event moves it to the end
            latest[entry["path"]] = entry
    if warn and problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        log.warning("%s: skipped %d line(s) that are not index entries: %s%s", folder / INDEX, len(problems),
                    "; ".join(problems[:5]), more)
    return latest


def _index_entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return f"{json.dumps(entry)[:40]} is not an object"
    if entry.get("event") not in ("saved", "removed"):
        return f"event {entry.get('event')!r} is neither 'saved' nor 'removed'"
    if "path" not in entry:
        return "it has no path"
    if (why := name_problem(entry["path"])) is not None:
        return f"path {entry['path']!r} {why}"
    if not isinstance(entry.get("run_id", ""), str):
        return "its run_id is not a string"
    return None


def committed(folder: Path) -> list[Path]:
    """Committed checkpoints in `folder`, newest first, from its append-only index."""
    return [folder / name for name in reversed(read_index(folder))]


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's {file name: {"size", "sha256"}}, or a CheckpointError naming it and why."""
    return checked_manifest(directory)["files"]


def checked_manifest(directory: Path) -> dict:
    """The whole manifest ("files", "run_id", and "weights": the files the weights writer wrote), checked
    against its schema, or a CheckpointError naming it and why."""
    path = directory / MANIFEST
    try:
        if path.stat().st_size > MANIFEST_LIMIT:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a manifest of file names and "
                                  f"digests holds (at most {MANIFEST_LIMIT})")
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing, so the checkpoint was never committed") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if (why := _manifest_problem(manifest)) is not None:
        raise CheckpointError(f"{path}: not a valid {FORMAT} manifest: {why}")
    return manifest


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return f"it is a JSON {type(manifest).__name__}, not an object"
    if manifest.get("format") != FORMAT:
        return f"format is {manifest.get('format')!r}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"'files' is a JSON {type(files).__name__}, not an object"
    for name in (STATE_JSON, STATE_TENSORS):
        if name not in files:
            return f"'files' lists no {name}"
    if not isinstance(manifest.get("run_id", ""), str):
        return "'run_id' is not a string"
    for name, entry in files.items():
        if _outside(name):
            return f"{name!r} names a file outside the checkpoint"
        if not isinstance(entry, dict):
            return f"the entry for {name} is a JSON {type(entry).__name__}, not an object"
        if type(entry.get("size")) is not int or entry["size"] < 0:
            return f"the entry for {name} has no 'size' (a byte count)"
        if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
            return f"the entry for {name} has no 'sha256' (64 hex digits)"
    weights = manifest.get("weights", [])
    if not isinstance(weights, list) or not all(isinstance(name, str) and name in files for name in weights):
        return "'weights' is not a list of names from 'files'"
    if not all(name.endswith(".safetensors") and name != STATE_TENSORS for name in weights):
        return "'weights' names a file that is not a safetensors file of weights"
    return None


def _outside(name: str) -> bool:
    """Does a file name from a checkpoint's own metadata point outside its folder (or at nothing)?"""
    parts = PurePosixPath(name).parts
    return not parts or name.startswith("/") or "\\" in name or ".." in parts or parts == (".",)


def verify(directory: Path, limit: int | None = None, read_back_only: bool = False) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest.

    Cheap checks come before any hashing, so a crafted manifest (naming a sparse file of 200 GB, say) is refused in
    microseconds rather than hashed for many minutes: every file is a regular file of the size the manifest says;
    a safetensors file is the size its own header declares; the state's JSON and the weights' index are at most
    METADATA_LIMIT; and the safetensors files to hash hold at most `limit` bytes (what the run's model and state can
    hold, `Checkpointing.checkpoint_size_limit`). `read_back_only`: hash only what a resume reads (`read_back_files`),
    not the files for people and tools (config.yaml, a tokenizer), which a resume never reads."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    files = read_manifest(directory)
    for name, expected in files.items():
        _check_file(directory / name, expected["size"])
    hashed = read_back_files(directory) if read_back_only else list(files)
    for name in (STATE_JSON, WEIGHTS_INDEX):
        if name in hashed and files[name]["size"] > METADATA_LIMIT:
            raise CheckpointError(f"{directory / name}: {files[name]['size']} bytes, more than a checkpoint writes "
                                  f"there (at most {METADATA_LIMIT})")
    tensor_bytes = sum(files[name]["size"] for name in hashed if name.endswith(".safetensors"))
    if limit is not None and tensor_bytes > limit:
        raise CheckpointError(f"{directory / MANIFEST}: seals {tensor_bytes} bytes of tensors, more than a checkpoint "
                              f"of this run can hold ({limit}: Checkpointing.checkpoint_size_limit)")
    with ThreadPoolExecutor() as pool:
        digests = pool.map(_sha256, [directory / name for name in hashed])
        for name, digest in zip(hashed, digests):
            if digest != files[name]["sha256"]:
                raise CheckpointError(f"{directory / name}: sha256 differs from the manifest (corrupted or modified)")


def _check_file(path: Path, size: int) -> None:
    """`path` is a regular file of `size` bytes (a safetensors file: the size its header declares, when it parses),
    or a CheckpointError says why not. A checkpoint writes no link: one could lead to a device or to any other file."""
    try:
        found = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{path}: missing") from None
    if not stat.S_ISREG(found.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a link, a folder or a device), which a checkpoint never "
                              "writes")
    if found.st_size != size:
        raise CheckpointError(f"{path}: size {found.st_size} != {size} in the manifest")
    # A header that does not parse is left to the digest (and to `limit`): a file we wrote always parses
    if path.suffix == ".safetensors" and (declared := _safetensors_size(path)) not in (None, size):
        raise CheckpointError(f"{path}: {size} bytes, but its safetensors header declares {declared}")


def _safetensors_size(path: Path) -> int | None:
    """The size a safetensors file has by its own header (8 bytes giving the header's length, the JSON header, then
    exactly the data its tensors' offsets index), or None when the header is not one."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > SAFETENSORS_HEADER_LIMIT:
            return None
        try:
            header = json.loads(f.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError):
            return None
    if not all(type(end) is int and end >= 0 for end in ends):
        return None
    return 8 + length + max(ends, default=0)


def read_latest(folder: Path, limit: int | None = None) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest committed checkpoint whose files verify (`limit`: see `verify`) and parse, its state dict, and the
    newer ones skipped with the reason (a damaged file, a garbled manifest, a state nested too deep to parse)."""
    skipped = []
    for path in committed(folder):
        try:
            return path, read(path, limit=limit), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, None, skipped


# ---------------------------------------------------------------------------------------------
# A trainer's state dict <-> a checkpoint folder


@dataclass
class Snapshot:
    """A checkpoint taken at a step boundary and not yet written: its final and temporary folders (config.yaml
    and the artifacts already in the latter), what writes its weights, the rest of the state."""
    path: Path
    tmp: Path
    write_weights: Callable[[Path], None]  # writes the weights into the folder it is given, from what it is bound to
    state: dict  # the trainer's state dict but its weights
    record: dict
    run_id: str


def take(path: Path, state: dict, write_weights: Callable[[Path], None], config_yaml: str, record: dict, *,
         run_id: str, artifacts=None, copy: bool = False) -> Snapshot:
    """A checkpoint's first half, run at the step boundary: clear what dead writers left in the folder, make the
    temporary folder, write config.yaml and the artifacts there (they may read the trainer, which moves on).

    `state` is a trainer's `state_dict()` but its "model", whose weights `write_weights(folder)` writes (bound to
    the model, or to a copy of it, by the trainer); `artifacts(folder)` may add files for people and tools (a
    tokenizer), sealed in the manifest like the rest and never read back; `record` is added to the folder's index
    entry, written by the run `run_id` (only that run may remove it). `copy`: the state is copied to CPU memory
    (`detached`), so `finish` may run in another thread while training changes the originals."""
    if path.exists():
        raise FileExistsError(f"{path}: a checkpoint there exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, run_id)
    tmp = temporary_dir(path)
    (tmp / "config.yaml").write_text(config_yaml)  # for people: never read back
    if artifacts is not None:
        artifacts(tmp)
    return Snapshot(path, tmp, write_weights, detached(state) if copy else state, dict(record), run_id)


def finish(snapshot: Snapshot) -> None:
    """A checkpoint's second half: the weights (through the snapshot's writer) and the state files, then `commit`,
    whose manifest records the safetensors files the writer wrote: the ones `read_weights` reads back."""
    before = _safetensors_in(snapshot.tmp)
    snapshot.write_weights(snapshot.tmp)
    weights = sorted(_safetensors_in(snapshot.tmp) - before)
    save_state(snapshot.tmp, snapshot.state)
    commit(snapshot.tmp, snapshot.path, snapshot.record, run_id=snapshot.run_id, weights=weights)


def _safetensors_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors") if p.is_file()}


def finish_in_background(snapshot: Snapshot) -> Future:
    """`finish(snapshot)` in a thread of its own; the future holds its error, if any. Not a daemon thread: a
    program that ends normally still commits the checkpoint it asked for."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paperloop-checkpoint")
    future = pool.submit(finish, snapshot)
    pool.shutdown(wait=False)  # the thread ends with this one write
    return future


def read(path: Path, verified: bool = False, limit: int | None = None) -> dict:
    """The state dict a checkpoint holds, "model" included, after verifying the files it is read from (unless the
    caller just did: `verified`); `limit`: see `verify`."""
    if not verified:
        verify(path, limit, read_back_only=True)
    state = load_state(path)
    state["model"] = read_weights(path)
    return state

"""JSONLLogger: what a run logs, as JSON lines for plots and scripts. Every run gets one (the trainer attaches it
unless you attach your own); the main process writes.

    <output_dir>/metrics.jsonl    one line per logged step: {"step": 12, "epoch": 0, "train/loss": 0.41, ...}
    <output_dir>/<name>.jsonl     one line per record of a `records/<name>` output: {"step": 12, "prompt": ...}

    import json
    lines = [json.loads(line) for line in open("runs/exp/metrics.jsonl")]
    curve = [(line["step"], line["train/loss"]) for line in lines if "train/loss" in line]

A resumed run writes no line twice. The lines of steps after the checkpoint it starts from were written by the run
that went on past that checkpoint (and was killed, or is being redone from an earlier one); the resumed run writes
them again. So before its first line into a file, each fit() rewrites the file with only the lines of steps up to
its start (`trim`); a complete last line missing its newline is terminated there, not joined by the next line. The
lines trimmed are this run's own: a folder holds one run's history, and the trainer refuses a new run, or another
run's resume, into a folder whose metrics.jsonl holds a logged step (`logged_history`). A run that stops early (a
signal, a time limit) logs its last step as it ends, like TensorBoardLogger; the run resumed from there keeps that
line and goes on after.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .loggers import RECORDS, StepLogger, is_scalar, scalar

log = logging.getLogger(__name__)

METRICS = "metrics"  # metrics.jsonl; a records/<name> output may not take this name


class JSONLLogger(StepLogger):
    """`metrics.jsonl` and `<name>.jsonl` under `directory` (default `output_dir`), at StepLogger's steps, which are
    TensorBoardLogger's: the same scalars under the same names, one line per logged step with its `step` (the
    global step) and `epoch` (the epoch the step ran in, from 0); values are floats (NaN and Infinity spelt as
    Python's json does). A step validation and a train log of one step, or a step and its epoch's close, are one
    line. Strings (`text/samples`) are not scalars and are left out.

    An output `records/<name>` holding a list of dicts (e.g. `records/rollouts`: one dict per completion) goes to
    `<name>.jsonl` at the logged steps, a line per dict with "step" first; it must be JSON-serializable (a
    tensor: `.item()` or `.tolist()` first), else the step raises a TypeError naming the key. It never reaches
    metrics.jsonl or TensorBoard. In DDP, the main process's outputs are what is written.

    Each line is flushed as it is written: a killed process loses none of them (a power loss may lose the last).
    """

    def __init__(self, directory: str | None = None, every_n_steps: int | None = None):
        super().__init__(every_n_steps)
        self.directory = directory
        self.files: dict[str, JSONLFile] = {}
        self.line: dict | None = None  # the step's metrics, written when the hook ends

    def logged_history(self, trainer) -> str | None:
        path = Path(self.directory or trainer.config.output_dir) / f"{METRICS}.jsonl"
        return f"{path} holds logged steps" if has_a_step(path) else None

    def _open(self, trainer):
        self.folder = Path(self.directory or trainer.config.output_dir)
        self.start_step = trainer.state.global_step  # lines of later steps are written again by this run
        self.files = {}  # each opened (and trimmed) at its first line
        self.line = None
        self.epoch = trainer.state.epoch

    def on_batch_end(self, trainer, outputs):
        self.epoch = trainer.state.epoch
        super().on_batch_end(trainer, outputs)
        self._end_line()

    def on_epoch_end(self, trainer, logs):
        self.epoch = trainer.state.epoch - 1  # the epoch that this step closed (state.epoch counts closed ones)
        super().on_epoch_end(trainer, logs)
        self._end_line()

    def _write(self, metrics: dict, step: int):
        values = {key: float(scalar(value)) for key, value in metrics.items() if is_scalar(value)}
        if not values:
            return
        if self.line is not None and self.line["step"] != step:
            self._end_line()
        if self.line is None:
            self.line = {"step": step, "epoch": self.epoch}
        self.line.update(values)

    def _end_line(self):
        """Write the step's line. Some steps log in two hooks (the epoch's last: its batch and the epoch's close;
        a resumed run's first: the close of an epoch whose last step the checkpointed run logged): the second
        merges into the file's last line, which holds the same step, so a step stays one line."""
        if self.line is None:
            return
        line, self.line = self.line, None
        file = self._file(METRICS)
        previous = file.last_record()
        if previous is not None and previous.get("step") == line["step"]:
            file.replace_last(encode({**previous, **line}))
        else:
            file.append([encode(line)])

    def _write_records(self, records: dict, step: int):
        encoded = {record_file(key): encode_records(key, value, step) for key, value in records.items()}
        for name, lines in encoded.items():  # only once every one has encoded: a step's records go in whole
            if lines:
                self._file(name).append(lines)

    def _file(self, name: str) -> JSONLFile:
        if name not in self.files:
            self.files[name] = JSONLFile(self.folder / f"{name}.jsonl", self.start_step)
        return self.files[name]

    def _close(self):
        try:
            self._end_line()
        finally:
            for file in self.files.values():
                file.close()
            self.files = {}


def encode(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def record_file(key: str) -> str:
    """The file name (no suffix) that the output `records/<name>` goes to."""
    name = key[len(RECORDS):]
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name == METRICS:
        raise ValueError(f"{key}: the name after {RECORDS!r} names the file <name>.jsonl beside {METRICS}.jsonl: "
                         f"letters, digits, '_', '-' and '.', and not {METRICS!r}")
    return name


def encode_records(key: str, records, step: int) -> list[bytes]:
    """One line per record of the output `key`, {"step": step, **record}."""
    if not isinstance(records, (list, tuple)):
        raise TypeError(f"{key}: a {RECORDS} output is a list of dicts (a line each), got {type(records).__name__}")
    lines = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(f"{key}[{i}]: a record is a dict, got {type(record).__name__}")
        if "step" in record:
            raise ValueError(f"{key}[{i}]: a record holds a 'step' key, which JSONLLogger writes (the global step)")
        try:
            lines.append(encode({"step": step, **record}))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{key}[{i}]: not JSON-serializable ({e}); a record holds numbers, strings, bools, "
                            "None, lists and dicts (a tensor: .item() or .tolist() first)") from None
    return lines


class JSONLFile:
    """A JSON-lines file that a run appends to, each write flushed; trimmed to the lines of steps up to
    `through_step` when opened."""

    def __init__(self, path: Path, through_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.last = trim(path, through_step)  # (offset, bytes) of the file's last line, or None
        self.file = open(path, "r+b" if path.exists() else "w+b")
        self.file.seek(0, os.SEEK_END)

    def last_record(self) -> dict | None:
        return None if self.last is None else json.loads(self.last[1])

    def append(self, lines: list[bytes]) -> None:
        offset = self.file.tell() + sum(map(len, lines[:-1]))
        self.file.write(b"".join(lines))
        self.file.flush()
        self.last = (offset, lines[-1])

    def replace_last(self, line: bytes) -> None:
        """Write `line` over the file's last line. A process killed mid-write leaves a torn last line, as a killed
        append does, which the next open drops (and with it that step's line)."""
        offset = self.last[0]
        self.file.seek(offset)
        self.file.write(line)
        self.file.truncate()
        self.file.flush()
        self.last = (offset, line)

    def close(self) -> None:
        self.file.close()


def trim(path: Path, through_step: int) -> tuple[int, bytes] | None:
    """Rewrite the JSON-lines file `path` with only its lines of steps up to `through_step`, atomically (a temporary
    file beside it, fsynced, then renamed over it); leave it as it is when that drops nothing. Returns the offset
    and bytes of its last line, or None when it has none (or does not exist).

    A last line that does not parse is one torn by a kill mid-write: dropped, with an info message. A line that
    does not parse, or has no integer "step", before the last one was not written by JSONLLogger (which writes a
    line whole before the next): dropped with a warning naming the file and line, as a reader could not use
    it, and the file's other lines are kept: a log that went wrong must not stop a resume."""
    if not path.exists():
        return None
    *lines, tail = path.read_bytes().split(b"\n")  # tail: b"" when the file ends with a newline, else a torn line
    kept, changed = [], False
    for number, line in enumerate(lines + ([tail] if tail else []), start=1):
        step = _step(line)
        if step is None:
            changed = True
            if number > len(lines):
                log.info("JSONLLogger: %s: dropped its torn last line (a process killed mid-write)", path)
            elif line.strip():
                log.warning("JSONLLogger: %s:%d is not a JSON object with an integer 'step'; dropped", path, number)
            continue
        if step <= through_step:
            kept.append(line + b"\n")
        else:
            changed = True
    changed = changed or bool(tail)  # a complete last line missing its newline gets one
    if changed:
        _replace(path, b"".join(kept))
    if not kept:
        return None
    return sum(map(len, kept[:-1])), kept[-1]


def has_a_step(path: Path) -> bool:
    """Does the JSON-lines file `path` hold a line of a logged step? (Read until the first one.)"""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return any(_step(line) is not None for line in f)


def _step(line: bytes) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):  # not JSON, not an object, no step
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself, durably
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

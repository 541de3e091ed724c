"""WandbLogger and TrackioLogger, offline: what each tracker holds, read back with the tracker's own reader, is what
JSONLLogger wrote (the same steps, names and values), every logged step once, after a run killed by SIGKILL past its
checkpoint and resumed; records/* outputs are the tracker's tables. The runs go in a worker (tracker_worker.py)."""

import json
import math
import re
import struct
from pathlib import Path

import pytest

from tests.support.workers import run_worker

WORKER = Path(__file__).with_name("tracker_worker.py")
KILL_AT = 8  # past the checkpoint at step 6; steps 7-8 (8 logged, with a validation) are redone by the resume


def jsonl_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value)]} from metrics.jsonl, timings left out (a redone step is timed anew)."""
    curves = {}
    for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in line.items():
            if key not in ("step", "epoch") and not key.startswith("perf/"):
                curves.setdefault(key, []).append((line["step"], value))
    return curves


def records(out: Path) -> dict[int, list[dict]]:
    """rollouts.jsonl's rows by step, without the step."""
    rows = {}
    for line in map(json.loads, (out / "rollouts.jsonl").read_text().splitlines()):
        rows.setdefault(line.pop("step"), []).append(line)
    return rows


def killed_and_resumed(tracker: str, out: Path, kill: bool = True) -> str:
    """The run goes on past its checkpoint at step 6 to step 8 and dies there (SIGKILL), or, with kill=False, ends
    there for good (its loggers closing, as a killed run's do not); then it is resumed from step 6."""
    if kill:
        killed = run_worker(WORKER, "--tracker", tracker, "--out", out, "--kill-at", KILL_AT, check=False,
                            timeout=240)
        assert killed.returncode == -9, killed.stderr[-2000:]
    else:
        run_worker(WORKER, "--tracker", tracker, "--out", out, "--end-at", KILL_AT, timeout=240)
    resumed = run_worker(WORKER, "--tracker", tracker, "--out", out, "--resume", timeout=240)
    return re.search(r"^run id: (\w+)$", resumed.stdout, re.M).group(1)  # the trainer's, the tracked run's


def assert_curves_match(tracked: dict, expected: dict):
    assert set(tracked) == set(expected)
    for key, points in expected.items():
        steps = [step for step, _ in tracked[key]]
        assert steps == sorted(set(steps)), f"{key}: a step logged twice: {steps}"
        assert steps == [step for step, _ in points], key
        for (_, got), (_, want) in zip(tracked[key], points):
            assert math.isclose(got, want, rel_tol=1e-6), (key, got, want)


# --- Weights & Biases ------------------------------------------------------------------------------------------------

def wandb_records(path: Path):
    """The protobuf records of an offline run's transaction log (run-<id>.wandb), parsed with wandb's own message
    types. The framing is W&B's: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks,
    each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    position, block, pieces = 7, 32 * 1024, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += block - position % block
            continue
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_history(folder: Path, run_id: str) -> list[dict]:
    """The run's history as W&B keeps it: its segments in the order they ran, each resumed segment's rewind point
    (branch_point, a step) cutting the history before it there (rows from that step on are set aside)."""
    rows = []
    segments = []
    for path in folder.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"):
        run = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"][0]
        segments.append((run.start_time.ToNanoseconds(), path, run))
    assert segments, f"no offline run {run_id} under {folder}"
    for _, path, run in sorted(segments, key=lambda s: s[0]):
        assert run.run_id == run_id
        if run.HasField("branch_point"):
            assert run.branch_point.run == run_id and run.branch_point.metric == "_step"
            rows = [row for row in rows if row["_step"] < run.branch_point.value]
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                row = {}
                for item in record.history.item:  # a table's fields come as nested keys: (name, field)
                    *outer, last = [item.key] if item.key else item.nested_key
                    place = row
                    for key in outer:
                        place = place.setdefault(key, {})
                    place[last] = json.loads(item.value_json)
                rows.append(row)
    return rows


def test_wandb_offline_run_resumed_from_before_its_end_holds_each_step_once_and_rollouts_as_tables(tmp_path,
                                                                                                   monkeypatch):
    """The first run logs steps 7-8 past its checkpoint; the resumed run rewinds W&B's history to step 7 and logs
    them again. (Not a SIGKILL: W&B's offline log of a killed run is lost whole, see callbacks/trackers.py.)"""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_id = killed_and_resumed("wandb", out, kill=False)
    history = wandb_history(out, run_id)
    assert {row["_step"] for row in history if row["_step"] <= KILL_AT} == {1, 2, 4, 6, 8}  # both runs' steps
    steps = [row["_step"] for row in history]
    assert steps == sorted(set(steps)), f"a step twice in W&B's history: {steps}"
    tracked = {}
    for row in history:
        for key, value in row.items():
            if not key.startswith(("_", "perf/", "records/")):
                tracked.setdefault(key, []).append((row["_step"], value))
    assert_curves_match(tracked, jsonl_curves(out))
    # records/rollouts: a wandb.Table at each logged step, whose file holds that step's rows
    tables = {row["_step"]: row["records/rollouts"] for row in history if "records/rollouts" in row}
    expected = records(out)
    assert sorted(tables) == sorted(expected)
    for step, table in tables.items():
        assert table["_type"] == "table-file" and table["nrows"] == len(expected[step])
        media = list(out.glob(f"wandb/offline-run-*-{run_id}/files/{table['path']}"))
        content = json.loads(media[0].read_text())
        assert [dict(zip(content["columns"], row)) for row in content["data"]] == expected[step]


# --- trackio ---------------------------------------------------------------------------------------------------------

def test_trackio_run_killed_and_resumed_holds_each_step_once_and_rollouts_as_tables(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # the workers' store, not the user's
    out = tmp_path / "run"
    run_id = killed_and_resumed("trackio", out)
    rows = json.loads(run_worker(WORKER, "--read-trackio", run_id).stdout)
    tracked, tables = {}, {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("records/"):
                assert row["step"] not in tables, f"step {row['step']}'s table twice"
                tables[row["step"]] = value
            elif key not in ("step", "timestamp") and not key.startswith("perf/"):
                tracked.setdefault(key, []).append((row["step"], value))
    assert_curves_match(tracked, jsonl_curves(out))
    expected = records(out)
    assert sorted(tables) == sorted(expected)
    for step, table in tables.items():
        assert table["_type"] == "trackio.table" and table["_value"] == expected[step]


def test_trackio_holds_every_step_up_to_the_checkpoint_when_killed_right_after_it(tmp_path, monkeypatch):
    """trackio writes its queue every half second; the checkpoint at step 6 waits for it, so a kill as step 7 begins
    loses no step that the resumed run (starting at 7) will not log again."""
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    out = tmp_path / "run"
    killed = run_worker(WORKER, "--tracker", "trackio", "--out", out, "--kill-before", 7, check=False, timeout=240)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    rows = json.loads(run_worker(WORKER, "--read-trackio", run_id).stdout)
    assert sorted({row["step"] for row in rows if "train/loss" in row}) == [1, 2, 4, 6]


def test_a_tracker_needs_a_project():
    from paperloop.callbacks import TrackioLogger, WandbLogger

    with pytest.raises(ValueError, match="project must be a non-empty string"):
        TrackioLogger(project="")
    with pytest.raises(ValueError, match="mode must be 'online', 'offline' or None"):
        WandbLogger(project="p", mode="disabled")

"""What checkpoint files may make a run do: names in checkpoint data never reach outside the run's
checkpoint folder, a run removes only checkpoints it wrote, garbled manifests and index lines are
skipped (or named in an error), leftovers of interrupted writes are cleaned up, the index reads in
linear time."""

import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
import time

import pytest

import paperloop.checkpoint as ckpt
from tests.support.callbacks import StopAt
from tests.support.engine import make_resume_trainer
from paperloop import CheckpointError
from paperloop.callbacks import ModelCheckpoint


def rewrite_file(checkpoint, name, text):
    """Replace one file of a checkpoint and rewrite the manifest to match, as an attacker would."""
    (checkpoint / name).write_text(text)
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


# ---- items 1 and 2: nothing outside, nothing of another run ------------------------------------


@pytest.mark.parametrize("crafted", ["../../victim", "ABSOLUTE", "..", "."])
def test_crafted_checkpoint_names_delete_nothing_outside(tmp_path, crafted, caplog):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    crafted = str(victim) if crafted == "ABSOLUTE" else crafted
    run = tmp_path / "run"
    make_resume_trainer(run, max_epochs=1, callbacks=[StopAt(3)]).fit()
    checkpoint = ckpt.committed(run / "checkpoints")[0]
    tree = json.loads((checkpoint / ckpt.STATE_JSON).read_text())
    tree["callbacks"]["ModelCheckpoint"]["saved"].insert(0, crafted)  # oldest: pruned at the next save
    rewrite_file(checkpoint, ckpt.STATE_JSON, json.dumps(tree))

    with caplog.at_level(logging.WARNING):
        make_resume_trainer(run, max_epochs=2).fit(resume=checkpoint)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (run / "checkpoints").is_dir() and (run / "checkpoints" / ckpt.INDEX).is_file()
    assert f"not removing checkpoint {crafted!r}" in caplog.text


def test_resuming_into_another_runs_folder_deletes_none_of_its_checkpoints(tmp_path, caplog):
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    make_resume_trainer(shared, callbacks=[ModelCheckpoint(every_n_steps=3, keep_last=100)]).fit()
    theirs = {p.name: (p / ckpt.STATE_TENSORS).read_bytes() for p in ckpt.committed(shared / "checkpoints")}
    assert {"step-000003", "step-000006", "step-000009"} <= theirs.keys()
    # Our run's list names step-000003, step-000006 and step-000009 too, in its own folder ...
    make_resume_trainer(elsewhere, callbacks=[StopAt(9)]).fit()
    ours = ckpt.committed(elsewhere / "checkpoints")[0]
    # ... and it continues into the folder holding the other run: it prunes only what it writes there. (A resume into
    # a folder another run owns is refused; one written before run.json recorded its owner is adopted, as here.)
    (shared / "run.json").unlink()
    with caplog.at_level(logging.WARNING):
        make_resume_trainer(shared).fit(resume=ours)
    for name, tensors in theirs.items():
        assert (shared / "checkpoints" / name / ckpt.STATE_TENSORS).read_bytes() == tensors, name
    refused = [r.getMessage() for r in caplog.records if "not removing checkpoint 'step-000006' from" in r.getMessage()]
    assert refused and "it was written by another run" in refused[0]
    index = [json.loads(line) for line in (shared / "checkpoints" / ckpt.INDEX).read_text().splitlines()]
    run_ids = {e["run_id"] for e in index}
    assert len(run_ids) == 2  # theirs and ours
    removed = [e for e in index if e["event"] == "removed"]
    saved_by = {e["path"]: e["run_id"] for e in index if e["event"] == "saved"}
    assert removed and all(saved_by[e["path"]] == e["run_id"] for e in removed)  # each by its own writer


def test_a_resumed_run_prunes_its_own_checkpoints_from_before_the_preemption(tmp_path):
    make_resume_trainer(tmp_path, callbacks=[StopAt(10)]).fit()
    make_resume_trainer(tmp_path).fit(resume="latest")
    # The same three as a run never interrupted keeps: the run id survived the resume.
    folder = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.committed(folder)] == ["step-000024", "step-000021", "step-000018"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["step-000024", "step-000021", "step-000018",
                                                               ckpt.INDEX])


def _one_checkpoint(folder, run_id="me"):
    tmp = ckpt.temporary_dir(folder / "step-1")
    (tmp / ckpt.STATE_JSON).write_text("{}")
    ckpt.commit(tmp, folder / "step-1", {}, run_id=run_id)
    return folder / "step-1"


@pytest.mark.parametrize("name, why", [
    ("../victim", "contains a path separator"), ("VICTIM", "contains a path separator"),
    ("..", "starts with '.'"), (".", "starts with '.'"), (".step-1.tmp-99", "starts with '.'"),
    ("", "not a non-empty string"), (None, "not a non-empty string"),
    ("step-2", "holds no saved checkpoint of that name"), ("link", "symbolic link"),
])
def test_record_removal_refuses_what_is_not_a_checkpoint_of_this_run(tmp_path, name, why, caplog):
    folder, victim = tmp_path / "checkpoints", tmp_path / "victim"
    victim.mkdir()
    _one_checkpoint(folder)
    (folder / "step-2").mkdir()  # a folder the index does not know
    (folder / "link").symlink_to(victim)
    name = str(victim) if name == "VICTIM" else name
    before = (folder / ckpt.INDEX).read_text()
    with caplog.at_level(logging.WARNING):
        assert ckpt.record_removal(folder, name, run_id="me") is False
    assert why in caplog.text and victim.is_dir() and (folder / "step-2").is_dir()
    assert (folder / ckpt.INDEX).read_text() == before


def test_record_removal_removes_only_the_writers_own(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    _one_checkpoint(folder, run_id="them")
    with caplog.at_level(logging.WARNING):
        assert ckpt.record_removal(folder, "step-1", run_id="me") is False
    assert "written by another run (run id them, this run is me)" in caplog.text and (folder / "step-1").is_dir()
    assert ckpt.record_removal(folder, "step-1", run_id="them") is True
    assert not (folder / "step-1").exists() and ckpt.committed(folder) == []


# ---- item 12: garbled manifests and index lines --------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run's output folder: checkpoints step-000003, step-000006 and step-000006.1."""
    out = tmp_path_factory.mktemp("finished")
    make_resume_trainer(out, max_epochs=1).fit()
    return out


def test_a_state_nested_too_deep_to_parse_is_skipped_by_latest_and_named_for_an_explicit_path(finished_run,
                                                                                               tmp_path, caplog):
    """A trainer_state.json of 100,000 nested lists, its manifest rewritten to match: Python's JSON parser
    raises RecursionError, which must read as a bad checkpoint (skipped by "latest"), not a crash."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    newest, previous = ckpt.committed(out / "checkpoints")[:2]
    rewrite_file(newest, ckpt.STATE_JSON, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=f"^{newest / ckpt.STATE_JSON}: nested too deeply"):
        make_resume_trainer(out).load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        resumed = make_resume_trainer(out, max_epochs=2)
        resumed.load_checkpoint("latest")
    assert f"skipped {newest}" in caplog.text  # and took the one before it
    assert resumed.state.global_step == ckpt.read(previous)["train_state"]["global_step"]


def garble(manifest_text, how):
    manifest = json.loads(manifest_text)
    name = ckpt.STATE_JSON
    if how == "size->rize":
        return manifest_text.replace('"size"', '"rize"', 1)  # one byte, still valid JSON
    if how == "entry-a-list":
        manifest["files"][name] = list(manifest["files"][name].values())
    elif how == "files-a-list":
        manifest["files"] = list(manifest["files"])
    elif how == "manifest-a-list":
        manifest = [manifest]
    elif how == "size-a-string":
        manifest["files"][name]["size"] = str(manifest["files"][name]["size"])
    elif how == "no-sha256":
        del manifest["files"][name]["sha256"]
    elif how == "file-outside":
        manifest["files"]["../../outside"] = manifest["files"][name]
    return json.dumps(manifest)


@pytest.mark.parametrize("how", ["size->rize", "entry-a-list", "files-a-list", "manifest-a-list", "size-a-string",
                                 "no-sha256", "file-outside"])
def test_garbled_manifest_is_skipped_by_latest_and_named_for_an_explicit_path(finished_run, tmp_path, how, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    folder = out / "checkpoints"
    newest, previous = ckpt.committed(folder)[:2]
    manifest = newest / ckpt.MANIFEST
    manifest.write_text(garble(manifest.read_text(), how))

    path, _, skipped = ckpt.read_latest(folder)
    assert path == previous
    assert skipped == [(newest, skipped[0][1])] and skipped[0][1].startswith(f"{manifest}: not a valid")
    with pytest.raises(CheckpointError, match=f"^{manifest}: not a valid"):
        make_resume_trainer(out).load_checkpoint(newest)
    if how == "size->rize":  # and through the trainer, as a user resumes
        with caplog.at_level(logging.WARNING):
            state = make_resume_trainer(out, max_epochs=2).fit(resume="latest")
        assert f"skipped {newest}: {manifest}: not a valid" in caplog.text and state.global_step == 12


def test_garbled_weight_index_is_an_error_naming_it(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    newest = ckpt.committed(out / "checkpoints")[0]
    rewrite_file(newest, ckpt.WEIGHTS_INDEX, json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match=f"^{newest / ckpt.WEIGHTS_INDEX}: not a valid index"):
        make_resume_trainer(out).load_checkpoint(newest)


@pytest.mark.parametrize("line", ["null", "123", "[1, 2]", '"step-000006.1"', '{"event": "saved"}',
                                  '{"event": "saved", "path": null}', '{"event": "saved", "path": "../x"}',
                                  '{"event": "saved", "path": 7}', '{"event": "deleted", "path": "step-000003"}',
                                  '{"event": "saved", "path": "step-000003", "run_id": 5}', '{"event": "sa'])
def test_index_lines_that_are_not_entries_are_skipped_with_a_reason(finished_run, tmp_path, line, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    index = out / "checkpoints" / ckpt.INDEX
    expected = ckpt.committed(out / "checkpoints")
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines + [line]) + "\n")
    with caplog.at_level(logging.WARNING):
        assert ckpt.committed(out / "checkpoints") == expected
    assert f"{index}: skipped 1 line(s) that are not index entries: line {len(lines) + 1}:" in caplog.text
    assert make_resume_trainer(out, max_epochs=2).fit(resume="latest").global_step == 12


def test_an_append_after_a_torn_line_lands_on_its_own_line(tmp_path):
    folder = tmp_path / "checkpoints"
    _one_checkpoint(folder)
    with open(folder / ckpt.INDEX, "a") as f:
        f.write('{"event": "saved", "pa')  # the process died in the middle of an append
    tmp = ckpt.temporary_dir(folder / "step-2")
    (tmp / ckpt.STATE_JSON).write_text("{}")
    ckpt.commit(tmp, folder / "step-2", {}, run_id="me")
    assert [p.name for p in ckpt.committed(folder)] == ["step-2", "step-1"]


# ---- item 13: leftovers of interrupted writes ----------------------------------------------------


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_next_save_removes_dead_writers_temporaries_and_this_runs_orphans_only(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "checkpoints"
    append = ckpt._append_index

    def killed_before_the_index_line(directory, entry):
        if entry["event"] == "saved" and entry["path"] == "step-000006":
            raise SystemExit("killed between rename and index append")
        append(directory, entry)

    monkeypatch.setattr(ckpt, "_append_index", killed_before_the_index_line)
    with pytest.raises(SystemExit):
        make_resume_trainer(tmp_path).fit()
    monkeypatch.setattr(ckpt, "_append_index", append)
    assert [p.name for p in ckpt.committed(folder)] == ["step-000003"]
    assert (folder / "step-000006" / ckpt.MANIFEST).is_file()  # our orphan
    pid = dead_pid()
    (folder / f".step-000009.tmp-{pid}").mkdir()
    (folder / f".step-000009.tmp-{pid}" / "model.safetensors").write_bytes(b"\0" * 1000)
    shutil.copytree(folder / "step-000006", folder / "step-000007")  # another run's orphan
    manifest = json.loads((folder / "step-000007" / ckpt.MANIFEST).read_text())
    (folder / "step-000007" / ckpt.MANIFEST).write_text(json.dumps({**manifest, "run_id": "another-run"}))
    (folder / "notes").mkdir()  # the user's own
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / f".step-000012.tmp-{live.pid}").mkdir()  # a writer still at work

        with caplog.at_level(logging.WARNING):
            make_resume_trainer(tmp_path, max_epochs=1).fit(resume="latest")
        left = {p.name for p in folder.iterdir()}
        assert {f".step-000009.tmp-{pid}", "step-000006"} & left == set()  # the orphan itself is gone
        assert {"step-000007", "notes", f".step-000012.tmp-{live.pid}"} <= left
        assert f"removed {folder / f'.step-000009.tmp-{pid}'}: an unfinished checkpoint write by pid {pid}" in caplog.text
        assert f"removed {folder / 'step-000006'}: a checkpoint of this run renamed into place but never indexed" \
            in caplog.text
    finally:
        live.kill()
        live.wait()


# ---- item 14: the index reads in linear time -------------------------------------------------------


def index_reading_work(folder, entries: int, monkeypatch) -> tuple[int, int]:
    """(JSON parses, Python and C function calls) that reading an index of `entries` lines takes: counts of work
    done, the same on any machine however busy, where a time would not be."""
    folder.mkdir()
    lines = [json.dumps({"event": "saved", "path": f"step-{i:06d}", "time": 0.0, "run_id": "r"}) for i in range(entries)]
    (folder / ckpt.INDEX).write_text("\n".join(lines) + "\n")
    parses, calls = [0], [0]
    loads = json.loads
    monkeypatch.setattr(ckpt.json, "loads", lambda text: parses.__setitem__(0, parses[0] + 1) or loads(text))

    def count(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(count)
    try:
        names = ckpt.committed(folder)
    finally:
        sys.setprofile(None)
    assert len(names) == entries and names[0].name == f"step-{entries - 1:06d}"
    return parses[0], calls[0]


def test_reading_the_index_is_linear_in_its_entries(tmp_path, monkeypatch):
    small_parses, small_calls = index_reading_work(tmp_path / "6k", 6_000, monkeypatch)
    large_parses, large_calls = index_reading_work(tmp_path / "60k", 60_000, monkeypatch)
    assert (small_parses, large_parses) == (6_000, 60_000)  # each line parsed once: the file is read once
    # Ten times the entries, ten times the work (a pass over earlier entries per line would make it a hundred).
    assert 9 < large_calls / small_calls < 11


def test_index_reading_matches_a_naive_replay(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    events = [(rng.choice(["saved", "saved", "removed"]), f"step-{rng.randrange(30)}") for _ in range(500)]
    (folder / ckpt.INDEX).write_text("".join(json.dumps({"event": e, "path": p}) + "\n" for e, p in events))
    order = []  # the reference: newest last, a re-save moves to the end, a removal drops it
    for event, name in events:
        if name in order:
            order.remove(name)
        if event == "saved":
            order.append(name)
    assert [p.name for p in ckpt.committed(folder)] == order[::-1]

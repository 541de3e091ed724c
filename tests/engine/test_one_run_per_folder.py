"""A folder holds one run's history (checkpoints, metrics.jsonl and records, TensorBoard events): a new run into an
output_dir holding another run's history is refused with a message saying how to resume or where else to go, and so
is a resume of run A's checkpoint into run B's folder; nothing of the other run is touched. A resumed run, the same
trainer's next fit() and a folder where a run wrote nothing yet go on. A complete last line missing its newline is
terminated before the resumed run appends."""

import json

import pytest

import paperloop.checkpoint as ckpt
from tests.support.engine import make_resume_trainer
from paperloop import ConfigError
from paperloop.callbacks import JSONLLogger, LambdaCallback, TensorBoardLogger


def stop_at(step):
    return LambdaCallback(on_batch_end=lambda t, o: t.state.global_step == step
                          and t.request_stop("test preemption", resumable=True))


def snapshot(folder):
    """Every file of a run's folder (the lock and the owner record aside) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("paperloop.lock",)}


def test_the_same_script_run_twice_without_resume_is_refused_and_the_first_run_kept(tmp_path):
    first = make_resume_trainer(tmp_path, max_epochs=1, callbacks=[TensorBoardLogger()])
    first.fit()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as refused:
        make_resume_trainer(tmp_path, max_epochs=1, callbacks=[TensorBoardLogger()]).fit()
    message = str(refused.value)
    assert message.startswith(f"output_dir: {tmp_path} holds another run's history (")
    for what in (f"{tmp_path / 'checkpoints'} holds checkpoints", f"{tmp_path / 'metrics.jsonl'} holds logged steps",
                 f"{tmp_path / 'tensorboard'} holds TensorBoard events"):
        assert what in message
    assert "resume it (fit(resume='latest'), or resume='auto'" in message and "choose another output_dir" in message
    assert snapshot(tmp_path) == before  # not a line trimmed, no checkpoint named step-000006.1 beside its own

    resumed = make_resume_trainer(tmp_path, max_epochs=2, callbacks=[TensorBoardLogger()])
    assert resumed.fit(resume="auto").global_step == 12  # the same command, resumed: its own folder
    assert resumed.state.run_id == first.state.run_id


def test_a_run_that_logged_but_never_checkpointed_is_refused_saying_so(tmp_path):
    crash = LambdaCallback(on_batch_begin=lambda t, s: t.state.global_step == 2 and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        make_resume_trainer(tmp_path, callbacks=[crash]).fit()
    assert (tmp_path / "metrics.jsonl").read_text() and not ckpt.committed(tmp_path / "checkpoints")
    with pytest.raises(ConfigError, match="it wrote no checkpoint to resume from: choose another output_dir, or "
                                          "delete those files to start over"):
        make_resume_trainer(tmp_path).fit(resume="auto")  # auto: nothing to continue, so a new run


def test_a_run_that_wrote_nothing_yet_leaves_the_folder_free(tmp_path):
    crash = LambdaCallback(on_batch_begin=lambda t, s: 1 / 0)  # before its first step: no line, no checkpoint
    with pytest.raises(ZeroDivisionError):
        make_resume_trainer(tmp_path, callbacks=[crash]).fit()
    assert make_resume_trainer(tmp_path, max_epochs=1).fit().global_step == 6


def test_the_same_trainers_next_fit_goes_on_in_its_folder(tmp_path):
    trainer = make_resume_trainer(tmp_path, max_epochs=1)
    trainer.fit()
    assert trainer.fit().global_step == 6  # its own run: nothing left to train, nothing refused


def test_resuming_run_a_into_run_b_s_folder_is_refused_and_b_kept(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_resume_trainer(a, callbacks=[stop_at(4)]).fit()
    run_b = make_resume_trainer(b, max_epochs=1)
    run_b.fit()
    before = snapshot(b)
    checkpoint_a = ckpt.committed(a / "checkpoints")[0]
    resumed = make_resume_trainer(b)
    with pytest.raises(ConfigError, match=rf"output_dir: {b} holds the history of run {run_b.state.run_id} \(.*\), and "
                                          rf"the checkpoint resumed is run [0-9a-f]+'s: their logs and checkpoints "
                                          "would mix"):
        resumed.fit(resume=checkpoint_a)
    assert snapshot(b) == before  # B's lines past A's step 4 are B's: none trimmed
    assert make_resume_trainer(tmp_path / "c").fit(resume=checkpoint_a).global_step == 24  # a new folder: fine


def test_tensorboard_events_alone_are_history_too(tmp_path):
    def build(logs):  # no checkpoints, and metrics.jsonl in a folder of each run's own
        return make_resume_trainer(tmp_path / "out", max_epochs=1, checkpoint_every_steps=None,
                                   callbacks=[TensorBoardLogger(), JSONLLogger(directory=str(tmp_path / logs))])

    build("logs-1").fit()
    with pytest.raises(ConfigError, match=r"holds another run's history \([^;]*/out/tensorboard holds TensorBoard "
                                          r"events\), which a new run would mix with"):
        build("logs-2").fit()


def test_a_folder_from_before_run_json_is_adopted_by_a_resume_and_refused_to_a_new_run(tmp_path):
    make_resume_trainer(tmp_path, callbacks=[stop_at(9)]).fit()
    (tmp_path / "run.json").unlink()  # written before the owner was recorded
    with pytest.raises(ConfigError, match="holds another run's history"):
        make_resume_trainer(tmp_path).fit()
    resumed = make_resume_trainer(tmp_path)
    assert resumed.fit(resume="latest").global_step == 24
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == resumed.state.run_id


def test_a_complete_last_line_missing_its_newline_is_terminated_before_the_next_append(tmp_path):
    make_resume_trainer(tmp_path, log_every_steps=1, callbacks=[stop_at(4)]).fit()
    path = tmp_path / "metrics.jsonl"
    text = path.read_text()
    assert text.endswith("\n") and json.loads(text.splitlines()[-1])["step"] == 4
    path.write_text(text[:-1])  # e.g. a copy that lost the final newline; the line itself is whole
    make_resume_trainer(tmp_path, log_every_steps=1, max_epochs=1).fit(resume="latest")
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]  # every line parses alone
    assert steps == [1, 2, 3, 4, 5, 6]

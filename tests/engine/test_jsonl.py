"""JSONLLogger: metrics.jsonl holds what TensorBoard gets, a line a logged step; records/<name> outputs go to
<name>.jsonl; a resumed run, killed or not, leaves every step's lines once, as a straight run writes them."""

import json
import logging

import numpy as np
import pytest
import torch

from tests.support.callbacks import StopAt
from tests.support.engine import Regression, ScheduledRegression, make_data, make_model, make_resume_trainer
from paperloop import TrainerConfig
from paperloop.callbacks import JSONLLogger, LambdaCallback, TensorBoardLogger
from paperloop.callbacks.jsonl import trim


class Recording(Regression):
    """Each step also outputs a count (int), a note (str), a flag (bool) and one record per sample."""

    def train_step(self, step):
        outputs = super().train_step(step)
        indices = torch.cat(step.micro_batches).tolist()
        outputs.update({"data/count": len(indices), "text/note": f"step {self.state.global_step + 1}",
                        "data/flag": True,
                        "records/rollouts": [{"index": i, "text": f"sample {i}"} for i in indices]})
        return outputs


class RecordingScheduled(ScheduledRegression):
    def train_step(self, step):
        outputs = super().train_step(step)
        outputs["records/rollouts"] = [{"index": i} for i in torch.cat(step.micro_batches).tolist()]
        return outputs


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_curves(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value as float32, as TensorBoard stores it)]}."""
    curves = {}
    for line in metrics:
        for key, value in line.items():
            if key not in ("step", "epoch"):
                curves.setdefault(key, []).append((line["step"], float(np.float32(value))))
    return curves


def run(out, cls=Recording, callbacks=(), **cfg):
    # 5 steps an epoch: the epochs' last steps (5, 10) fall off the log cadence
    config = TrainerConfig(**{"max_epochs": 2, "batch_size": 8, "log_every_steps": 3, "val_every_steps": 2,
                              "output_dir": str(out), **cfg})
    trainer = cls(make_model(), config, train_data=make_data(40), val_data=make_data(8), callbacks=list(callbacks))
    trainer.fit()
    return trainer


def test_metrics_jsonl_holds_the_steps_and_scalars_tensorboard_gets(tmp_path):
    run(tmp_path, callbacks=[TensorBoardLogger()])
    metrics = lines(tmp_path / "metrics.jsonl")
    tensorboard, curves = tensorboard_scalars(tmp_path / "tensorboard"), as_curves(metrics)
    rate = "perf/samples_per_s"  # each logger times the steps itself
    assert [s for s, _ in curves.pop(rate)] == [s for s, _ in tensorboard.pop(rate)] == [1, 3, 5, 6, 9, 10]
    assert curves == tensorboard
    assert {"train/loss", "optim/lr", "data/count", "val/loss", "epoch/train_loss"} <= tensorboard.keys()
    assert not any(key.startswith(("text/", "records/", "train/finite", "data/flag")) for key in tensorboard)
    assert [line["step"] for line in metrics] == [1, 2, 3, 4, 5, 6, 8, 9, 10]  # once each, in order
    assert [line["epoch"] for line in metrics] == [0] * 5 + [1] * 4  # the epoch each step ran in


def test_a_validation_is_on_the_line_of_its_step(tmp_path):
    trainer = run(tmp_path)
    by_step = {line["step"]: line for line in lines(tmp_path / "metrics.jsonl")}
    for record in trainer.state.val_history:  # steps 2, 4, 5 (the epoch's), 6, 8, 10 (both: one validation)
        assert by_step[record["step"]]["val/loss"] == pytest.approx(record["val/loss"], rel=1e-6)
    assert [s for s, line in by_step.items() if "val/loss" in line] == [2, 4, 5, 6, 8, 10]
    assert "train/loss" not in by_step[2]  # validation only
    # Step 10 logs in two hooks: validation and the train log when the step ends, the epoch's loss when it closes.
    assert {"val/loss", "train/loss", "epoch/train_loss"} <= by_step[10].keys()
    assert by_step[10]["epoch/train_loss"] == pytest.approx(trainer.state.train_loss_history[1], rel=1e-6)


def test_records_go_to_their_own_file_at_the_logged_steps_only(tmp_path):
    taken = {}
    spy = LambdaCallback(on_batch_begin=lambda t, step: taken.update(
        {t.state.global_step + 1: torch.cat(step.micro_batches).tolist()}))
    run(tmp_path, callbacks=[spy])
    logged = [line["step"] for line in lines(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert logged == [1, 3, 5, 6, 9, 10]
    rollouts = lines(tmp_path / "rollouts.jsonl")
    assert rollouts == [{"step": s, "index": i, "text": f"sample {i}"} for s in logged for i in taken[s]]
    assert list(rollouts[0]) == ["step", "index", "text"]
    assert not any(key.startswith("records/") for line in lines(tmp_path / "metrics.jsonl") for key in line)


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in records]


def straight(folder, **cfg):
    make_resume_trainer(folder, cls=RecordingScheduled, **cfg).fit()
    return {name: lines(folder / f"{name}.jsonl") for name in ("metrics", "rollouts")}


RESUME_CFG = dict(log_every_steps=2, val_every_steps=4)  # 6 steps an epoch, 4 epochs, a checkpoint every 3 steps


def test_a_run_resumed_from_before_where_it_got_writes_each_line_once(tmp_path):
    """The run went on to step 14 past its checkpoint at step 9 (as a run killed at 14 does); resumed from 9,
    it writes steps 10-14 again: each is in the files once, and the files are a straight run's."""
    expected = straight(tmp_path / "straight", **RESUME_CFG)
    stop = StopAt(14, resumable=False)
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, callbacks=[stop], **RESUME_CFG).fit()
    assert lines(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 14
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, **RESUME_CFG).fit(
        resume=tmp_path / "run" / "checkpoints" / "step-000009")
    for name in ("metrics", "rollouts"):
        got = lines(tmp_path / "run" / f"{name}.jsonl")
        assert without_timings(got) == without_timings(expected[name]), name
    steps = [line["step"] for line in lines(tmp_path / "run" / "metrics.jsonl")]
    assert steps == sorted(set(steps))


def test_a_resume_from_before_an_epoch_closed_merges_into_its_last_steps_line(tmp_path):
    """A signal at an epoch's last step checkpoints before the epoch closes; the resumed run starts by closing it,
    and its epoch loss joins the step's line instead of starting a second one."""
    expected = straight(tmp_path / "straight", **RESUME_CFG)
    signal = StopAt(6, checkpoint=True, reason="signal")
    make_resume_trainer(tmp_path / "run", callbacks=[signal], cls=RecordingScheduled, **RESUME_CFG).fit()
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, **RESUME_CFG).fit(
        resume=tmp_path / "run" / "checkpoints" / "step-000006")  # taken in the step, before the epoch's close
    for name in ("metrics", "rollouts"):
        assert without_timings(lines(tmp_path / "run" / f"{name}.jsonl")) == without_timings(expected[name]), name


def test_a_line_torn_by_a_kill_is_dropped_and_the_resume_goes_on(tmp_path):
    expected = straight(tmp_path / "straight", **RESUME_CFG)
    stop = StopAt(10)  # a logged step: no extra line
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, callbacks=[stop], **RESUME_CFG).fit()
    for name in ("metrics", "rollouts"):  # as if killed in the middle of writing a later step's line
        with open(tmp_path / "run" / f"{name}.jsonl", "a") as f:
            f.write('{"step": 12, "train/lo')
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, **RESUME_CFG).fit(resume="latest")
    for name in ("metrics", "rollouts"):
        assert without_timings(lines(tmp_path / "run" / f"{name}.jsonl")) == without_timings(expected[name]), name


def test_trim_keeps_the_steps_up_to_the_start_and_warns_about_a_broken_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\nnot json\n{"step": 2, "a": 2}\n\n{"step": 3, "a": 3}\n{"step": 4')
    with caplog.at_level(logging.INFO):
        last = trim(path, 2)
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
    assert last == (len('{"step": 1, "a": 1}\n'), b'{"step": 2, "a": 2}\n')
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"JSONLLogger: {path}:2 is not a JSON object with an integer 'step'; dropped"]
    assert "torn last line" in caplog.text
    assert trim(path, 0) is None and path.read_text() == ""  # a fresh run starts it empty


def test_a_fresh_run_in_a_used_folder_is_refused_and_its_files_kept(tmp_path):
    from paperloop import ConfigError

    run(tmp_path)
    before = {name: (tmp_path / f"{name}.jsonl").read_bytes() for name in ("metrics", "rollouts")}
    with pytest.raises(ConfigError, match="output_dir: .* holds another run's history"):
        run(tmp_path, max_epochs=1)
    assert {name: (tmp_path / f"{name}.jsonl").read_bytes() for name in ("metrics", "rollouts")} == before


def test_a_record_that_json_cannot_write_is_a_type_error_naming_its_key(tmp_path):
    class Tensors(Regression):
        def train_step(self, step):
            return {**super().train_step(step), "records/rollouts": [{"reward": torch.tensor(1.0)}]}

    with pytest.raises(TypeError, match=r"^records/rollouts\[0\]: not JSON-serializable \(Object of type Tensor"):
        run(tmp_path, cls=Tensors)
    assert not (tmp_path / "rollouts.jsonl").exists()


def test_every_run_gets_one_unless_one_is_attached_and_only_the_main_process_writes(tmp_path):
    mine = JSONLLogger(directory=str(tmp_path / "mine"), every_n_steps=1)
    trainer = run(tmp_path / "out", callbacks=[mine])
    assert [cb for cb in trainer.callbacks if isinstance(cb, JSONLLogger)] == [mine]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert [line["step"] for line in lines(tmp_path / "mine" / "metrics.jsonl")] == list(range(1, 11))

    config = TrainerConfig(max_epochs=1, batch_size=8, output_dir=str(tmp_path / "other"))
    other = Regression(make_model(), config, train_data=make_data(16))
    other.is_main_process = False  # as on rank 1 of a DDP run
    other.fit()
    assert not (tmp_path / "other" / "metrics.jsonl").exists()


def test_a_run_stopped_between_logged_steps_logs_its_last_step_once(tmp_path):
    """A signal at step 9 (not a logged step): the run logs step 9 as it ends, so its curve ends where it stopped;
    the resumed run goes on after it, and the files are a straight run's with that one line more."""
    expected = straight(tmp_path / "straight", **RESUME_CFG)
    stop = StopAt(9, checkpoint=True, reason="signal")
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, callbacks=[stop], **RESUME_CFG).fit()
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, **RESUME_CFG).fit(resume="latest")
    for name in ("metrics", "rollouts"):
        got = without_timings(lines(tmp_path / "run" / f"{name}.jsonl"))
        assert [r for r in got if r["step"] != 9] == without_timings(expected[name]), name
        assert [r["step"] for r in got].count(9) == (1 if name == "metrics" else 8), name


def test_tensorboard_keeps_the_resume_steps_own_events_and_drops_the_killed_runs_later_ones(tmp_path):
    """Resumed from the checkpoint at step 12 (a logged step) of a run that went on to 14: TensorBoard's curves are
    the straight run's, step 12 included (purging from the checkpoint's own step would hide it) and 13-14 once."""
    def scalars(folder):
        return {k: [step for step, _ in v] for k, v in tensorboard_scalars(folder / "tensorboard").items()
                if not k.startswith(("perf/", "time/"))}

    straight_run = tmp_path / "straight"
    make_resume_trainer(straight_run, cls=RecordingScheduled, callbacks=[TensorBoardLogger()], **RESUME_CFG).fit()
    stop = StopAt(14, resumable=False)
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, callbacks=[TensorBoardLogger(), stop],
                        **RESUME_CFG).fit()
    make_resume_trainer(tmp_path / "run", cls=RecordingScheduled, callbacks=[TensorBoardLogger()], **RESUME_CFG).fit(
        resume=tmp_path / "run" / "checkpoints" / "step-000012")
    expected = scalars(straight_run)
    assert 12 in expected["train/loss"]
    assert scalars(tmp_path / "run") == expected

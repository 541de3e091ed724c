"""Stock callbacks, each for the behaviour a user relies on."""

import pytest
import torch

from paperloop.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar, TensorBoardLogger
from tests.support.callbacks import StopAt
from tests.support.engine import Regression, make_data, make_model, weights
from paperloop import TrainerConfig


class ScriptedVal(Regression):
    """validation_step reports a scripted val/loss per epoch (and snapshots the weights it saw)."""

    script: list = []

    def validation_step(self, batch):
        self.seen_weights = getattr(self, "seen_weights", {})
        self.seen_weights[self.state.epoch] = weights(self.unwrapped_model)
        return {"loss": torch.tensor(self.script[self.state.epoch - 1])}


def run_scripted(tmp_path, script, callbacks=(), **cfg):
    cls = type("Scripted", (ScriptedVal,), {"script": script})
    cfg.setdefault("max_epochs", len(script))
    t = cls(make_model(), TrainerConfig(batch_size=8, output_dir=str(tmp_path), **cfg), train_data=make_data(16),
            val_data=make_data(8), callbacks=list(callbacks))
    return t, t.fit()


@pytest.mark.parametrize("script, kwargs, stop_epoch", [
    ([5, 4, 4.5, 4.2, 4.1, 3.0], dict(patience=3), 5),  # best at epoch 2, then 3 epochs without
    ([5, 4, 4.5, 3.9, 4.1, 4.0, 3.0], dict(patience=2), 6),  # the counter resets at epoch 4
    ([5, 4.95, 4.92, 4.91, 1.0], dict(patience=3, min_delta=0.1), 4),  # gains under min_delta do not count
    ([5, 4, 3, 2, 1], dict(patience=2, baseline=3.5), 2),  # 5 and 4 do not beat the baseline
    ([1, 2, 3, 2.5, 2.9, 4], dict(patience=2, mode="max"), 5),
])
def test_early_stopping_stops_at_the_right_epoch(tmp_path, script, kwargs, stop_epoch):
    _, state = run_scripted(tmp_path, script, [EarlyStopping(**kwargs)])
    assert state.epoch == stop_epoch
    assert state.should_stop and state.stop_reason.startswith("early stopping: val/loss")


def test_config_patience_attaches_early_stopping(tmp_path):
    t, state = run_scripted(tmp_path, [3, 2, 2.5, 2.6, 1], early_stopping_patience=2)
    (stopper,) = [cb for cb in t.callbacks if isinstance(cb, EarlyStopping)]
    assert state.epoch == 4 and stopper.best == 2


def test_restore_best_puts_back_the_best_epochs_weights(tmp_path):
    t, state = run_scripted(tmp_path, [3, 1, 2, 2.5], [EarlyStopping(patience=2, restore_best=True)])
    assert state.epoch == 4
    best = t.seen_weights[2]
    for k, v in weights(t.unwrapped_model).items():
        assert torch.equal(v, best[k])


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_logger_writes_the_curves(tmp_path):
    cfg = TrainerConfig(max_epochs=2, batch_size=8, log_every_steps=2, max_grad_norm=10.0, output_dir=str(tmp_path))
    t = Regression(make_model(), cfg, train_data=make_data(32), val_data=make_data(16),
                   callbacks=[TensorBoardLogger()])
    t.fit()
    scalars, acc = _scalars(tmp_path / "tensorboard")
    for tag in ("train/loss", "optim/lr", "optim/grad_norm", "perf/samples_per_s"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 4, 6, 8]  # the first step, then every 2nd
    assert [s for s, _ in scalars["val/loss"]] == [4, 8]
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([h["val/loss"] for h in t.state.val_history])
    assert [v for _, v in scalars["epoch/train_loss"]] == pytest.approx(t.state.train_loss_history)
    assert all(v > 0 for _, v in scalars["perf/samples_per_s"])
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_a_run_shorter_than_the_log_interval_still_logs_its_steps_and_lr(tmp_path):
    from paperloop.callbacks import LambdaCallback

    seen = {}
    spy = LambdaCallback(on_batch_end=lambda t, o: seen.update({t.state.global_step: float(o["train/loss"])}))
    cfg = TrainerConfig(max_epochs=3, batch_size=8, lr=0.01, log_every_steps=50, output_dir=str(tmp_path))
    Regression(make_model(), cfg, train_data=make_data(16), callbacks=[spy, TensorBoardLogger()]).fit()
    scalars, _ = _scalars(tmp_path / "tensorboard")
    # 2 steps an epoch: the first step, then each epoch's last (the run's last among them)
    assert scalars["train/loss"] == [(s, pytest.approx(seen[s])) for s in (1, 2, 4, 6)]
    assert scalars["optim/lr"] == [(s, pytest.approx(0.01)) for s in (1, 2, 4, 6)]
    assert [s for s, _ in scalars["epoch/train_loss"]] == [2, 4, 6]


def test_step_validation_on_an_epoch_end_runs_and_logs_once(tmp_path):
    calls = []

    class Counting(Regression):
        def validation_step(self, batch):
            calls.append(self.state.global_step)
            return super().validation_step(batch)

    # 4 steps an epoch, validation every 2 steps and every epoch: steps 4 and 8 are both
    cfg = TrainerConfig(max_epochs=2, batch_size=8, val_every_steps=2, output_dir=str(tmp_path))
    t = Counting(make_model(), cfg, train_data=make_data(32), val_data=make_data(8), callbacks=[TensorBoardLogger()])
    t.fit()
    assert calls == [2, 4, 6, 8]  # one batch of 8 validation samples each time
    assert [h["step"] for h in t.state.val_history] == [2, 4, 6, 8]
    scalars, _ = _scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["val/loss"]] == [2, 4, 6, 8]
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([h["val/loss"] for h in t.state.val_history])


@pytest.mark.parametrize("settings, reason", [
    (dict(), "there is no val_data"),
    (dict(val_every=0, val_every_steps=2), "val_every=0"),
])
def test_early_stopping_on_a_validation_metric_without_validation_is_refused(tmp_path, settings, reason):
    """It could never fire: the run would train to its end, silently, instead of stopping. (The config's
    early_stopping_patience without val_data is refused as the trainer is built.)"""
    val = make_data(8) if settings else None
    cfg = TrainerConfig(max_epochs=3, batch_size=8, output_dir=str(tmp_path), **settings)
    t = Regression(make_model(), cfg, train_data=make_data(16), val_data=val,
                   callbacks=[EarlyStopping("val/loss", patience=2)])
    with pytest.raises(ValueError, match=f"EarlyStopping: monitors 'val/loss', .*: {reason}, so it could never"):
        t.fit()
    assert t.state.global_step == 0
    cfg = TrainerConfig(max_epochs=3, batch_size=8, output_dir=str(tmp_path / "train"))  # a train metric is fine
    state = Regression(make_model(), cfg, train_data=make_data(16),
                       callbacks=[EarlyStopping("train/loss", patience=1, min_delta=1e9)]).fit()
    assert state.stop_reason.startswith("early stopping: train/loss did not improve")


def test_progress_without_a_terminal_is_a_plain_line_every_few_seconds_by_default(tmp_path, capsys, monkeypatch):
    """No callback attached, stderr a pipe (a batch job's log): a run is not silent. A fake clock moves 4 s a
    reading, so with lines at most every 10 s they come after steps 3 and 6, and at the last."""
    from paperloop.callbacks import progress

    readings = iter(range(0, 1000, 4))
    monkeypatch.setattr(progress, "clock", lambda: next(readings))
    cfg = TrainerConfig(max_epochs=1, batch_size=4, output_dir=str(tmp_path))
    state = Regression(make_model(), cfg, train_data=make_data(32)).fit()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "training 8 steps"
    assert [line.split(", loss ")[0] for line in lines[1:]] == ["step 3/8 (38%)", "step 6/8 (75%)", "step 8/8 (100%)"]
    assert lines[-1] == f"step 8/8 (100%), loss {state.last_loss:.4g}, 4.0 s/step, about 0 s left"
    assert lines[1].endswith(", 4.0 s/step, about 20 s left")


def test_progress_bar_disabled_is_silent(tmp_path, capsys):
    cfg = TrainerConfig(max_epochs=1, batch_size=8, log_every_steps=1, output_dir=str(tmp_path))
    Regression(make_model(), cfg, train_data=make_data(32), callbacks=[ProgressBar(disable=True)]).fit()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_bar_shows_loss_when_forced_on(tmp_path, capsys):
    cfg = TrainerConfig(max_epochs=1, batch_size=8, log_every_steps=1, output_dir=str(tmp_path))
    Regression(make_model(), cfg, train_data=make_data(32), callbacks=[ProgressBar(disable=False)]).fit()
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=" in err and "samples_s=" in err


def test_model_checkpoint_keeps_the_best_and_the_newest(tmp_path):
    from paperloop.callbacks import ModelCheckpoint
    from paperloop.checkpoint import committed

    # 2 optimizer steps an epoch, a checkpoint at each epoch's end; val/loss is best after epoch 2
    t, _ = run_scripted(tmp_path, [3, 1, 2, 4], [ModelCheckpoint(monitor="val/loss", save_top_k=1, keep_last=1)])
    assert [p.name for p in committed(tmp_path / "checkpoints")] == ["step-000008", "step-000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoints.jsonl", "step-000004",
                                                                            "step-000008"]


def test_a_misspelt_monitor_is_warned_about_once_naming_the_keys(tmp_path, caplog):
    import logging

    from paperloop.callbacks import ModelCheckpoint

    with caplog.at_level(logging.WARNING):
        run_scripted(tmp_path / "a", [3, 2, 1], [EarlyStopping(monitor="val/los"),
                                                 ModelCheckpoint(monitor="val/los", every_n_epochs=1)])
    for owner in ("EarlyStopping", "ModelCheckpoint"):
        lines = [r.message for r in caplog.records if r.message.startswith(owner)]
        assert lines == [f"{owner}: the monitored metric 'val/los' is not in the logs; they hold "
                         "['optim/lr', 'train/loss', 'val/loss']"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # validation every 2nd epoch: absent on the others, not misspelt
        run_scripted(tmp_path / "b", [3, 2, 1, 0], [EarlyStopping(monitor="val/loss")], val_every=2)
    assert "monitored metric" not in caplog.text


def test_checkpoint_every_steps_means_steps_only_and_one_checkpoint_a_step(tmp_path):
    from paperloop.checkpoint import INDEX, committed

    # 4 steps an epoch, 3 epochs; every 4 steps falls on each epoch's end
    cfg = TrainerConfig(max_epochs=3, batch_size=8, checkpoint_every_steps=4, output_dir=str(tmp_path))
    Regression(make_model(), cfg, train_data=make_data(32)).fit()
    names = [p.name for p in committed(tmp_path / "checkpoints")]
    assert names == ["step-000012", "step-000008", "step-000004"]
    index = [__import__("json").loads(line) for line in (tmp_path / "checkpoints" / INDEX).read_text().splitlines()]
    assert [e["path"] for e in index if e["event"] == "saved"] == ["step-000004", "step-000008", "step-000012"]

    cfg = TrainerConfig(max_epochs=2, batch_size=8, checkpoint_every_steps=3, output_dir=str(tmp_path / "b"))
    Regression(make_model(), cfg, train_data=make_data(32)).fit()  # every 3 steps, and the finished run
    assert [p.name for p in committed(tmp_path / "b" / "checkpoints")] == ["step-000008", "step-000006",
                                                                           "step-000003"]


def test_one_checkpoint_a_step_whatever_the_callback_order(tmp_path):
    from paperloop.checkpoint import committed

    # 4 steps an epoch; a stop asked for at step 4 (the epoch's last) by a callback listed after ModelCheckpoint
    stop = StopAt(4, resumable=False)
    for name, callbacks in (("after", [ModelCheckpoint(every_n_steps=2, every_n_epochs=None), stop]),
                            ("before", [stop, ModelCheckpoint(every_n_steps=2, every_n_epochs=None)])):
        cfg = TrainerConfig(max_epochs=3, batch_size=8, output_dir=str(tmp_path / name))
        Regression(make_model(), cfg, train_data=make_data(32), callbacks=callbacks).fit()
        assert [p.name for p in committed(tmp_path / name / "checkpoints")] == ["step-000004", "step-000002"], name


def test_tensorboard_writes_string_outputs_as_text(tmp_path):
    class Noting(Regression):
        def training_step(self, batch):
            return {"loss": super().training_step(batch), "text/note": f"epoch {self.state.epoch}"}

    cfg = TrainerConfig(max_epochs=2, batch_size=8, log_every_steps=2, output_dir=str(tmp_path))
    Noting(make_model(), cfg, train_data=make_data(16), callbacks=[TensorBoardLogger()]).fit()
    _, acc = _scalars(tmp_path / "tensorboard")
    events = acc.Tensors("text/note/text_summary")
    assert [e.step for e in events] == [1, 2, 4]
    assert [e.tensor_proto.string_val[0].decode() for e in events] == ["epoch 0", "epoch 0", "epoch 1"]


def test_early_stopping_threshold_stops_as_soon_as_it_is_reached(tmp_path):
    _, state = run_scripted(tmp_path / "max", [50, 90, 99.2, 99.9], [EarlyStopping("val/loss", mode="max",
                                                                                  stopping_threshold=99.0)])
    assert state.epoch == 3 and state.stop_reason == "early stopping: val/loss reached 99.2 (threshold 99) at epoch 3"
    _, state = run_scripted(tmp_path / "min", [3, 0.5, 0.09, 0.01], [EarlyStopping(stopping_threshold=0.1)])
    assert state.epoch == 3

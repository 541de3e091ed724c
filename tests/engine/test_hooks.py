"""The hook order is a contract: a recorder callback asserts the exact sequence."""

import pytest

from paperloop.callbacks import LambdaCallback
from tests.support.callbacks import Recorder
from tests.support.engine import Regression, make_data, make_model
from paperloop import TrainerConfig


def test_exact_hook_sequence_with_accumulation(tmp_path):
    rec = Recorder()
    cfg = TrainerConfig(max_epochs=2, batch_size=4, grad_accum_steps=2, output_dir=str(tmp_path))
    Regression(make_model(), cfg, train_data=make_data(16), val_data=make_data(8), callbacks=[rec]).fit()
    expected = [("on_train_begin", 0, 0)]
    step = 0
    for epoch in range(2):
        expected.append(("on_epoch_begin", epoch, step))
        for _ in range(2):  # 16 samples / (4 * 2) = 2 steps; their 2 micro-batches each fire no hooks
            expected += [("on_batch_begin", epoch, step), ("on_batch_end", epoch, step + 1)]
            step += 1
        expected.append(("on_epoch_end", epoch + 1, step))
    expected.append(("on_train_end", 2, 4))
    assert rec.calls == expected


def test_callbacks_run_in_list_order_in_every_hook(tmp_path):
    order = []

    class Tagged(Recorder):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def _rec(self, name, trainer):
            order.append((name, self.tag))

    cfg = TrainerConfig(max_epochs=1, batch_size=8, output_dir=str(tmp_path))
    Regression(make_model(), cfg, train_data=make_data(8), callbacks=[Tagged("a"), Tagged("b"), Tagged("c")]).fit()
    hooks = ["on_train_begin", "on_epoch_begin", "on_batch_begin", "on_batch_end", "on_epoch_end", "on_train_end"]
    assert order == [(h, tag) for h in hooks for tag in "abc"]


def test_epoch_logs_hold_train_val_and_lr(tmp_path):
    seen = []
    cb = LambdaCallback(on_epoch_end=lambda trainer, logs: seen.append(dict(logs)))
    cfg = TrainerConfig(max_epochs=2, batch_size=8, lr=0.01, output_dir=str(tmp_path))
    t = Regression(make_model(), cfg, train_data=make_data(32), val_data=make_data(16), callbacks=[cb])
    t.fit()
    assert [logs["epoch"] for logs in seen] == [1, 2]
    for logs in seen:
        assert {"train/loss", "val/loss", "val/mae", "optim/lr"} <= logs.keys()
        assert logs["optim/lr"] == 0.01
    assert [logs["train/loss"] for logs in seen] == t.state.train_loss_history
    assert [h["val/loss"] for h in t.state.val_history] == [logs["val/loss"] for logs in seen]


def test_on_train_end_runs_when_training_step_raises(tmp_path):
    class Broken(Regression):
        def training_step(self, batch):
            if self.state.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch)

    rec = Recorder()
    t = Broken(make_model(), TrainerConfig(batch_size=4, output_dir=str(tmp_path)), train_data=make_data(32),
               callbacks=[rec])
    with pytest.raises(RuntimeError, match="boom"):
        t.fit()
    assert rec.calls[-1] == ("on_train_end", 0, 2)
    assert isinstance(t.error, RuntimeError)


def test_stop_request_ends_after_the_current_step(tmp_path):
    def stop_at_3(trainer, outputs):
        if trainer.state.global_step == 3:
            trainer.request_stop("enough")

    rec = Recorder()
    t = Regression(make_model(), TrainerConfig(max_epochs=5, batch_size=4, output_dir=str(tmp_path)),
                   train_data=make_data(32), callbacks=[LambdaCallback(on_batch_end=stop_at_3), rec])
    state = t.fit()
    assert (state.global_step, state.epoch, state.stop_reason) == (3, 0, "enough")
    assert [c[0] for c in rec.calls].count("on_epoch_end") == 0  # the unfinished epoch is not closed


def test_lambda_callback_rejects_unknown_hooks():
    with pytest.raises(TypeError, match="on_step_end"):
        LambdaCallback(on_step_end=lambda t, o: None)

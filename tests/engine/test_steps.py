"""The loop step: a weighted loss whose update does not depend on how the step is split, the public
primitives (forward_backward, optimizer_step) a subclass reshapes a step with, non-finite and abandoned
steps, and the trainer's state as one dict."""

import logging
import os
import signal
from pathlib import Path

import pytest
import torch

import paperloop.checkpoint as ckpt
from tests.support.callbacks import StopAt
from tests.support.engine import (Regression, ScheduledRegression, ThreeUpdates, WeightedRegression,
                                  assert_bitwise_equal, make_data, make_indexed_data, make_model, make_resume_trainer,
                                  optimizer_tensors, sample_weight, straight_and_resumed, weights)
from tests.support.workers import run_worker
from paperloop import TrainerConfig
from paperloop.callbacks import (EarlyStopping, LambdaCallback, ModelCheckpoint, ProgressBar, TensorBoardLogger,
                                 TerminateOnNonFinite, TimeLimit)
from paperloop.plans import epoch_permutation

RESUME_WORKER = Path(__file__).with_name("resume_worker.py")

# ---- weighted steps ---------------------------------------------------------------------------


def fit_weighted(tmp_path, **cfg):
    losses = []
    spy = LambdaCallback(on_batch_end=lambda t, o: losses.append(float(o["train/loss"])))
    config = TrainerConfig(max_epochs=2, lr=0.05, output_dir=str(tmp_path), **cfg)
    t = WeightedRegression(make_model(dropout=0.0), config, train_data=make_indexed_data(44), callbacks=[spy])
    t.fit()
    return t, losses


def test_weighted_loss_is_the_same_however_the_step_is_split(tmp_path):
    # 44 samples in steps of 8: the last step of each epoch holds 4, weighted 1, 2 or 3 each.
    big, big_losses = fit_weighted(tmp_path / "big", batch_size=8)
    accum, accum_losses = fit_weighted(tmp_path / "accum", batch_size=2, grad_accum_steps=4)
    for k, v in weights(big.model).items():
        torch.testing.assert_close(weights(accum.model)[k], v, rtol=0, atol=1e-6)
    assert accum_losses == pytest.approx(big_losses, rel=1e-6)
    assert accum.state.train_loss_history == pytest.approx(big.state.train_loss_history, rel=1e-6)


def test_step_loss_is_the_weighted_mean_over_the_whole_step(tmp_path):
    model = make_model(dropout=0.0)
    x, y, index = make_indexed_data(44).tensors
    first = epoch_permutation(44, seed=0, epoch=0)[:8]
    with torch.no_grad():
        errors = (model(x[first]) - y[first]).squeeze(1) ** 2
    w = sample_weight(index[first])
    expected = float((w * errors).sum() / w.sum())
    assert expected != pytest.approx(float(errors.mean()), rel=1e-3)  # the weights matter here
    _, losses = fit_weighted(tmp_path, batch_size=2, grad_accum_steps=4)
    assert losses[0] == pytest.approx(expected, rel=1e-6)


# ---- a step that makes several updates -----------------------------------------------------------

_straight = {}


def straight_three_updates(tmp_path_factory):
    if "t" not in _straight:
        t = make_resume_trainer(tmp_path_factory.mktemp("three"), cls=ThreeUpdates)
        t.fit()
        _straight["t"] = t
    return _straight["t"]


def assert_same_three_update_run(resumed, reference):
    assert_bitwise_equal(weights(resumed.model), weights(reference.model))
    assert_bitwise_equal(optimizer_tensors(resumed), optimizer_tensors(reference))
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert resumed.state.train_loss_history == reference.state.train_loss_history
    assert (resumed.state.global_step, resumed.state.updates) == (24, 72)


def _scalar_steps(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_three_updates_a_step_count_schedule_log_and_checkpoint_by_step(tmp_path, tmp_path_factory, capsys):
    reference = straight_three_updates(tmp_path_factory)
    assert (reference.state.global_step, reference.state.updates) == (24, 72)
    assert reference.scheduler.last_epoch == 72  # the LR schedule steps once per update
    callbacks = [ModelCheckpoint(every_n_steps=5, every_n_epochs=None, keep_last=10), TensorBoardLogger(),
                 ProgressBar(disable=False)]
    t = make_resume_trainer(tmp_path, cls=ThreeUpdates, checkpoint_every_steps=None, log_every_steps=4,
                            callbacks=callbacks)
    t.fit()
    assert_bitwise_equal(weights(t.model), weights(reference.model))
    assert [p.name for p in ckpt.committed(tmp_path / "checkpoints")][::-1] == [
        "step-000005", "step-000010", "step-000015", "step-000020", "step-000024"]
    # first step, every 4th, each epoch's last (6 steps an epoch): loop steps, not updates
    assert _scalar_steps(tmp_path / "tensorboard", "train/loss") == [1, 4, 6, 8, 12, 16, 18, 20, 24]
    assert "24/24" in capsys.readouterr().err


def test_three_updates_a_step_sigkill_then_resume_is_bitwise_identical(tmp_path, tmp_path_factory):
    proc = run_worker(RESUME_WORKER, "--out", tmp_path, "--three-updates", "--hook", "on_batch_begin", "--step", "13",
                      check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert ckpt.committed(tmp_path / "checkpoints")[0].name == "step-000012"
    resumed = make_resume_trainer(tmp_path, cls=ThreeUpdates)
    resumed.fit(resume="latest")
    assert_same_three_update_run(resumed, straight_three_updates(tmp_path_factory))


def test_three_updates_a_step_time_limit_and_signal_stop_at_a_step_boundary(tmp_path, tmp_path_factory, monkeypatch):
    import paperloop.callbacks.guards as guards

    clock = {"now": 0.0}
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock["now"])
    tick = LambdaCallback(on_batch_end=lambda t, o: clock.update(now=clock["now"] + 1.0))
    state = make_resume_trainer(tmp_path / "time", cls=ThreeUpdates, callbacks=[tick, TimeLimit(10)]).fit()
    assert (state.global_step, state.updates, state.stop_reason) == (10, 30, "time limit of 10 s")
    resumed = make_resume_trainer(tmp_path / "time", cls=ThreeUpdates)
    resumed.fit(resume="latest")
    assert_same_three_update_run(resumed, straight_three_updates(tmp_path_factory))

    class SignalledMidStep(ThreeUpdates):
        def update(self, batches, shares=None, loss_fn=None):  # SIGTERM in the 2nd update of step 8: it still ends
            if self.state.global_step == 7 and self.state.updates == 22:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().update(batches, shares, loss_fn)

    state = make_resume_trainer(tmp_path / "signal", cls=SignalledMidStep).fit()
    assert (state.global_step, state.updates, state.stop_reason) == (8, 24, "signal")
    assert ckpt.committed(tmp_path / "signal" / "checkpoints")[0].name == "step-000008"
    resumed = make_resume_trainer(tmp_path / "signal", cls=ThreeUpdates)
    resumed.fit(resume="latest")
    assert_same_three_update_run(resumed, straight_three_updates(tmp_path_factory))


def test_update_is_forward_backward_of_each_batch_with_its_share_then_one_optimizer_step(tmp_path):
    """`update(batches, shares)` is the weighted step in one call: plain SGD over two batches with shares 1/4 and
    3/4 moves the weights by exactly lr x (1/4 grad_1 + 3/4 grad_2), once; its outputs are optimizer_step's and the
    loss function's other values, share-weighted; a generator of batches works, a count that does not fit the
    shares is refused."""
    cfg = TrainerConfig(batch_size=8, output_dir=str(tmp_path))
    t = SGD(make_model(dropout=0.0), cfg, train_data=make_data(16))
    t.setup()
    x, y = make_data(16).tensors
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    reference = make_model(dropout=0.0)
    grads = [torch.autograd.grad(torch.nn.functional.mse_loss(reference(bx), by), list(reference.parameters()))
             for bx, by in batches]

    def loss_fn(batch):
        bx, by = batch
        loss = torch.nn.functional.mse_loss(t.model(bx), by)
        return {"loss": loss, "first_x": bx[0, 0]}

    outputs = t.update((b for b in batches), [0.25, 0.75], loss_fn)
    for p, p0, g1, g2 in zip(t.model.parameters(), reference.parameters(), *grads):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.05 * (0.25 * g1 + 0.75 * g2), rtol=0, atol=1e-7)
    assert t.state.updates == 1 and outputs["train/finite"] and "optim/lr" in outputs
    assert float(outputs["first_x"]) == pytest.approx(0.25 * float(x[0, 0]) + 0.75 * float(x[8, 0]))  # share-weighted
    with pytest.raises(ValueError, match="2 batches for 3 shares"):
        t.update(batches, [0.2, 0.3, 0.5])


def test_primitives_refuse_a_gradient_that_would_leak_across_steps(tmp_path):
    class Leaky(Regression):
        def train_step(self, step):
            batch = self.fetch(step.micro_batches[0])
            self.forward_backward(batch)
            outputs = self.optimizer_step()
            self.forward_backward(batch)  # after the last update: would land in the next step
            return outputs

    cfg = TrainerConfig(batch_size=8, output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="after its last optimizer_step"):
        Leaky(make_model(), cfg, train_data=make_data(16)).fit()
    t = Regression(make_model(), cfg, train_data=make_data(16))
    t.setup()
    with pytest.raises(RuntimeError, match="without a forward_backward"):
        t.optimizer_step()


# ---- non-finite and abandoned steps ------------------------------------------------------------


class SGD(Regression):
    def configure_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05)


def sgd_run(tmp_path, cls, callbacks=(), **cfg):
    config = TrainerConfig(**{"max_epochs": 2, "batch_size": 4, "grad_accum_steps": 2, "output_dir": str(tmp_path),
                              **cfg})
    t = cls(make_model(dropout=0.0), config, train_data=make_data(40), callbacks=list(callbacks))
    return t, t.fit()


@pytest.mark.parametrize("poison", ["nan-loss", "inf-grad"])
def test_a_non_finite_micro_batch_skips_its_whole_step_and_the_run_goes_on(tmp_path, poison, caplog):
    """Step 3's first micro-batch (not its last) goes bad: nothing of step 3 is applied, its gradient is
    dropped, and every later step is as if step 3 had contributed zero."""
    def bad(model):
        if poison == "nan-loss":
            return torch.tensor(float("nan"))
        w = model[0].weight  # a finite loss (0) whose gradient is infinite: 1e38 * 1e38 overflows
        return (w - w.detach()).sum() * 1e38 * 1e38

    class Poisoned(SGD):
        def training_step(self, batch):
            self.calls = getattr(self, "calls", []) + [self.state.global_step]
            loss = super().training_step(batch)
            is_first_of_step_3 = self.state.global_step == 2 and self.calls.count(2) == 1
            return loss + bad(self.model) if is_first_of_step_3 else loss

    class ZeroedStep3(SGD):
        def training_step(self, batch):
            loss = super().training_step(batch)
            return loss * 0.0 if self.state.global_step == 2 else loss

    with caplog.at_level(logging.WARNING):
        poisoned, state = sgd_run(tmp_path / "p", Poisoned)
    assert "step 3: the loss or gradient is not finite" in caplog.text
    reference, _ = sgd_run(tmp_path / "r", ZeroedStep3)
    assert state.global_step == 10 and state.updates == 9 and not state.should_stop
    assert_bitwise_equal(weights(poisoned.model), weights(reference.model))
    assert all(torch.isfinite(v).all() for v in weights(poisoned.model).values())

    _, stopped = sgd_run(tmp_path / "t", Poisoned, callbacks=[TerminateOnNonFinite()])
    assert stopped.global_step == 3 and stopped.stop_reason.startswith("non-finite loss or gradient at step 3")


def test_fit_again_after_an_exception_mid_step_drops_the_half_step_and_skips_no_samples(tmp_path):
    class FailsOnce(SGD):
        failed = False

        def training_step(self, batch):
            if self.state.global_step == 4 and not self.failed and len(getattr(self, "seen", [])) % 2 == 1:
                FailsOnce.failed = True  # in step 5's second micro-batch, after the first's backward
                raise RuntimeError("flaky storage")
            self.seen = getattr(self, "seen", []) + [1]
            return super().training_step(batch)

    t = FailsOnce(make_model(dropout=0.0), TrainerConfig(max_epochs=2, batch_size=4, grad_accum_steps=2,
                                                          output_dir=str(tmp_path / "f")), train_data=make_data(40))
    with pytest.raises(RuntimeError, match="flaky storage"):
        t.fit()
    assert t.state.global_step == 4
    t.fit()  # the same trainer, again: it retakes step 5 from a clean gradient
    reference, _ = sgd_run(tmp_path / "r", SGD)
    assert t.state.global_step == 10
    assert_bitwise_equal(weights(t.model), weights(reference.model))


# ---- the state as one dict ---------------------------------------------------------------------


def test_state_dict_round_trip_in_memory_continues_exactly(tmp_path):
    """Take the state after 7 steps, put it into a fresh trainer, and both go on to the same end."""
    stop = StopAt(7)
    first = make_resume_trainer(tmp_path / "a", checkpoint_every_steps=None, callbacks=[stop])
    first.fit()
    state = first.state_dict()
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "train_state", "config", "data", "epoch_loss",
                          "callbacks", "extra", "fingerprints", "processes"}
    second = make_resume_trainer(tmp_path / "b", checkpoint_every_steps=None)
    second.load_state_dict(state)
    second.fit()
    reference = make_resume_trainer(tmp_path / "c", checkpoint_every_steps=None)
    reference.fit()
    assert_bitwise_equal(weights(second.model), weights(reference.model))
    assert second.state.train_loss_history == reference.state.train_loss_history


def test_callback_states_follow_their_state_key_not_their_position(tmp_path):
    scripts = {"val/loss": [5, 4, 4.5, 4.6], "val/mae": [1, 2, 3, 0.5]}

    class Scripted(ScheduledRegression):
        def validation_step(self, batch):
            return {k.removeprefix("val/"): torch.tensor(v[self.state.epoch - 1]) for k, v in scripts.items()}

    def build(callbacks):
        return make_resume_trainer(tmp_path / "run", checkpoint_every_steps=None, callbacks=callbacks, cls=Scripted)

    stop = LambdaCallback(on_epoch_end=lambda t, logs: t.state.epoch == 3 and t.request_stop("x", resumable=True))
    first = [EarlyStopping("val/loss", patience=5), EarlyStopping("val/mae", patience=5)]
    build([*first, ModelCheckpoint(), stop]).fit()
    assert [(cb.best, cb.wait) for cb in first] == [(4, 1), (1, 2)]
    again = [EarlyStopping("val/mae", patience=5), EarlyStopping("val/loss", patience=5)]  # reversed, one in front
    build([LambdaCallback(), *again, ModelCheckpoint()]).fit(resume="latest")
    assert [(cb.best, cb.wait) for cb in again] == [(0.5, 0), (4, 2)]  # epoch 4 went on from each one's own
    with pytest.raises(ValueError, match="state_key 'EarlyStopping\\[val/loss\\]'"):
        build([EarlyStopping("val/loss"), EarlyStopping("val/loss", patience=2)])


def test_a_registered_generator_is_checkpointed_and_resumed(tmp_path):
    class Noisy(ScheduledRegression):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.noise = self.register_generator("noise", torch.Generator().manual_seed(1234))

        def training_step(self, batch):
            x, y = batch
            return super().training_step((x + 0.1 * torch.randn(x.shape, generator=self.noise), y))

    def build(out, callbacks=()):
        return make_resume_trainer(out, callbacks=callbacks, cls=Noisy)

    reference, resumed = straight_and_resumed(build, tmp_path, stop_at=10)
    assert_bitwise_equal(weights(resumed.model), weights(reference.model))


def test_a_training_steps_other_metrics_are_weighted_by_the_micro_batches_shares(tmp_path):
    """Under accumulation, a metric training_step returns beside the loss is the step's weighted mean (each
    micro-batch by its share of the step's weight), like the loss; a plain mean of the micro-batches would not
    be, with samples weighing 1, 2 or 3."""
    class WithMetric(WeightedRegression):
        def training_step(self, batch):
            x, y, index = batch
            return {"loss": super().training_step(batch), "index_mean": (sample_weight(index) * index).sum()
                    / sample_weight(index).sum()}

    seen = []
    t = WithMetric(make_model(dropout=0.0), TrainerConfig(max_steps=3, batch_size=3, grad_accum_steps=2, lr=0.05,
                                                         output_dir=str(tmp_path)), train_data=make_indexed_data(12),
                   callbacks=[LambdaCallback(on_batch_begin=lambda tr, step: seen.append(step))])
    outputs = []
    t.callbacks.append(LambdaCallback(on_batch_end=lambda tr, o: outputs.append(o)))
    t.fit()
    for step, o in zip(seen, outputs):
        index = torch.cat(step.micro_batches).float()
        w = sample_weight(index.long())
        assert float(o["index_mean"]) == pytest.approx(float((w * index).sum() / w.sum()))


def test_ddp_share_scaling_and_per_process_rng_in_one_process(tmp_path):
    """The two rules 2-process tests alone would catch, checked here fast: forward_backward scales a loss by
    share x world_size (DDP then averages the processes' gradients), and a resume restores each process's own RNG
    streams, the entry of its rank."""
    t = Regression(make_model(dropout=0.0), TrainerConfig(batch_size=8, output_dir=str(tmp_path / "a")),
                   train_data=make_data(16))
    t.setup()
    x, y = make_data(8).tensors
    seen = []
    t._backward, t.world_size = (lambda loss: seen.append(loss.detach())), 2
    t.forward_backward((x, y), share=0.25)
    loss = float(t.training_step((x, y)).detach())
    assert float(seen[0]) == pytest.approx(loss * 0.25 * 2)
    t._pending_loss, t.optimizer_step = None, lambda: {}
    # no shares: each batch of each process weighs the same, 1 / (the batches of all processes), counted by a sum
    for other_batches in (1, 3):
        t.reduce_sum = lambda count: count + other_batches  # the other process's count
        t.update([(x, y)])
        assert float(seen[-1]) == pytest.approx(loss * 2 / (1 + other_batches))
    r = make_resume_trainer(tmp_path / "b")
    state = r.state_dict()
    torch.manual_seed(123)
    other_rank = torch.get_rng_state()
    state["processes"] = [state["processes"][0], {**state["processes"][0], "torch": other_rank}]
    r.world_size, r.rank = 2, 1
    r.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), other_rank)  # rank 1's entry, not rank 0's

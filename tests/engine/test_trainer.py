"""BaseTrainer behaviour a user relies on: evaluation averages, data order, accumulation, errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from paperloop.callbacks import TerminateOnNonFinite
from tests.support.callbacks import StopAt
from tests.support.engine import Regression, assert_bitwise_equal, make_data, make_model, make_resume_trainer, weights
from paperloop import BaseTrainer, CheckpointError, ConfigError, TrainerConfig, Weighted
from paperloop.plans import EpochPlan, epoch_permutation


def fit_weights(tmp_path, n=40, **cfg):
    cfg.setdefault("max_epochs", 2)
    t = Regression(make_model(dropout=0.0), TrainerConfig(output_dir=str(tmp_path), **cfg), train_data=make_data(n))
    t.fit()
    return weights(t.model), t


def test_validate_averages_over_all_samples_not_batches(tmp_path):
    class MeanOfY(BaseTrainer):
        def training_step(self, batch):
            return self.model(batch[0]).sum()

        def validation_step(self, batch):
            assert not self.model.training and not torch.is_grad_enabled()
            return {"y": batch[1].mean()}

    y = torch.arange(10.0)  # batches of 4, 4, 2: a mean of batch means would be (1.5 + 5.5 + 8.5) / 3
    data = TensorDataset(torch.zeros(10, 4), y)
    t = MeanOfY(make_model(), TrainerConfig(batch_size=4, output_dir=str(tmp_path)), val_data=data, test_data=data)
    assert t.validate() == {"val/y": pytest.approx(4.5)}
    assert t.test() == {"test/y": pytest.approx(4.5)}
    assert t.model.training


def test_a_validation_step_may_weigh_a_metric_by_what_it_is_a_mean_over(tmp_path):
    """`Weighted(total, weight)`: the loss per unit of something (SFT: trained tokens), beside a per-sample metric, in
    one evaluation loop; the weights here (1 + index) differ per sample, so a per-batch or per-sample mean differs."""
    class TokenMean(BaseTrainer):
        def training_step(self, batch):
            return self.model(batch[0]).sum()

        def validation_step(self, batch):
            x, y = batch
            tokens = 1.0 + y
            return {"per_token": Weighted((y * tokens).sum(), tokens.sum()), "y": y.mean()}

    y = torch.arange(10.0)
    data = TensorDataset(torch.zeros(10, 4), y)
    t = TokenMean(make_model(), TrainerConfig(batch_size=4, output_dir=str(tmp_path)), val_data=data)
    expected = float((y * (1 + y)).sum() / (1 + y).sum())
    assert t.validate() == {"val/per_token": pytest.approx(expected), "val/y": pytest.approx(4.5)}
    assert expected != pytest.approx(4.5)


def test_resume_auto_starts_fresh_or_continues_the_newest_checkpoint(tmp_path):
    """The same command starts a run or continues it: what papers run on every invocation."""
    straight = make_resume_trainer(tmp_path / "straight")
    assert straight.fit(resume="auto").global_step == 24  # nothing there yet: a fresh start
    stop = StopAt(9)
    assert make_resume_trainer(tmp_path / "resumed", callbacks=[stop]).fit(resume="auto").interrupted
    resumed = make_resume_trainer(tmp_path / "resumed")
    state = resumed.fit(resume="auto")  # the checkpoint of step 9: continued, not restarted
    assert (state.global_step, state.interrupted) == (24, False)
    assert_bitwise_equal(weights(resumed.model), weights(straight.model))


def test_time_limit_s_in_the_config_attaches_a_time_limit(tmp_path):
    from paperloop.callbacks import TimeLimit

    t = Regression(make_model(), TrainerConfig(time_limit_s=3600, output_dir=str(tmp_path)), train_data=make_data(8))
    assert [cb.seconds for cb in t.callbacks if isinstance(cb, TimeLimit)] == [3600]
    with pytest.raises(ConfigError, match="time_limit_s"):
        TrainerConfig(time_limit_s=0)


def epoch_of(plan: EpochPlan) -> list:
    steps = []
    for step in plan.steps():
        steps.append(step)
        plan.advance()
    return steps


def test_data_order_is_seeded_and_independent_of_batch_size():
    perm = epoch_permutation(50, seed=3, epoch=1)
    assert torch.equal(perm, epoch_permutation(50, seed=3, epoch=1))
    assert not torch.equal(perm, epoch_permutation(50, seed=3, epoch=2))
    assert sorted(perm.tolist()) == list(range(50))
    big = [torch.cat(s.micro_batches) for s in epoch_of(EpochPlan(50, 8, seed=3))]
    small = [torch.cat(s.micro_batches) for s in epoch_of(EpochPlan(50, 2, grad_accum_steps=4, seed=3))]
    assert all(torch.equal(a, b) for a, b in zip(big, small)) and len(big) == len(small) == 7
    two_ranks = [epoch_of(EpochPlan(50, 4, world_size=2, rank=r, seed=3)) for r in (0, 1)]
    for s0, s1, whole in zip(*two_ranks, big):
        assert s0.samples == s1.samples == len(whole)
        assert torch.equal(torch.cat(s0.micro_batches + s1.micro_batches), whole)


def test_a_plan_resumes_at_its_offset_and_refuses_another_shape():
    plan = EpochPlan(50, 8, seed=3)
    straight = epoch_of(EpochPlan(50, 8, seed=3))
    for _ in range(3):
        next(plan.steps())
        plan.advance()
    resumed = EpochPlan(50, 8, seed=3)
    resumed.load_state_dict(plan.state_dict())
    rest = epoch_of(resumed)
    assert len(rest) == 4 and all(torch.equal(a.micro_batches[0], b.micro_batches[0]) for a, b in zip(rest, straight[3:]))
    with pytest.raises(ValueError, match="seed 3, this run seed 4"):
        EpochPlan(50, 8, seed=4).load_state_dict(plan.state_dict())
    with pytest.raises(ValueError, match="samples_per_step is 8, this run's 16"):
        EpochPlan(50, 16, seed=3).load_state_dict(plan.state_dict())
    with pytest.raises(ValueError, match="samples_per_step is 8, this run's 9"):  # 7 steps an epoch either way
        EpochPlan(50, 9, seed=3).load_state_dict(plan.state_dict())
    with pytest.raises(ValueError, match="num_samples is 50, this run's 51"):
        EpochPlan(51, 8, seed=3).load_state_dict(plan.state_dict())


def test_step_weights_are_known_on_every_rank_without_communication():
    w = torch.arange(12, dtype=torch.float64)
    ranks = [EpochPlan(12, 2, grad_accum_steps=2, world_size=2, rank=r, shuffle=False, weights=w) for r in (0, 1)]
    (s0, *_), (s1, *_) = epoch_of(ranks[0]), epoch_of(ranks[1])
    assert s0.weight == s1.weight == 0 + 1 + 2 + 3 + 4 + 5 + 6 + 7  # samples 0..7, over both ranks
    assert s0.micro_weights == (1.0, 5.0) and s1.micro_weights == (9.0, 13.0)
    assert sum(s0.shares()) + sum(s1.shares()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        EpochPlan(12, 2, weights=torch.ones(11))
    with pytest.raises(ValueError, match="finite and >= 0"):
        EpochPlan(12, 2, weights=torch.full((12,), float("nan")))


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    # 44 samples: the last optimizer step holds 4, which accumulation must weight by sample count.
    big, _ = fit_weights(tmp_path / "a", n=44, batch_size=8)
    accum, _ = fit_weights(tmp_path / "b", n=44, batch_size=2, grad_accum_steps=4)
    for k in big:
        torch.testing.assert_close(big[k], accum[k], rtol=1e-5, atol=1e-6)


def test_same_config_same_weights(tmp_path):
    a, ta = fit_weights(tmp_path / "a", batch_size=8)
    b, tb = fit_weights(tmp_path / "b", batch_size=8)
    assert_bitwise_equal(a, b)
    assert ta.state.train_loss_history == tb.state.train_loss_history


def test_max_steps_stops_mid_epoch(tmp_path):
    _, t = fit_weights(tmp_path, n=40, batch_size=8, max_epochs=10, max_steps=7)
    assert (t.state.global_step, t.state.epoch, t.state.step_in_epoch) == (7, 1, 2)


def test_last_loss_is_the_last_steps_loss_and_survives_a_checkpoint(tmp_path):
    """A run shorter than an epoch has no epoch mean yet (train_loss_history is empty): state.last_loss is its loss,
    the last step's, and a checkpoint carries it."""
    from paperloop.callbacks import LambdaCallback
    from paperloop.checkpoint import committed

    losses = []
    record = LambdaCallback(on_batch_end=lambda trainer, outputs: losses.append(float(outputs["train/loss"])))
    cfg = TrainerConfig(batch_size=8, max_steps=3, output_dir=str(tmp_path))
    t = Regression(make_model(), cfg, train_data=make_data(40), callbacks=[record, StopAt(2, checkpoint=True)])
    assert t.fit().last_loss == losses[-1] and t.state.train_loss_history == []
    resumed = Regression(make_model(), cfg, train_data=make_data(40))
    resumed.load_checkpoint(committed(tmp_path / "checkpoints")[0])
    assert resumed.state.last_loss == losses[1]
    state = resumed.fit(resume="latest")
    assert state.global_step == 3 and state.train_loss_history == [] and isinstance(state.last_loss, float)


def test_bf16_on_cpu_learns(tmp_path):
    t = Regression(make_model(dropout=0.0), TrainerConfig(max_epochs=30, batch_size=8, lr=0.02, precision="bf16",
                                                          output_dir=str(tmp_path)), train_data=make_data(64))
    history = t.fit().train_loss_history
    assert history[-1] < 0.2 * history[0]


def test_gradient_clipping_is_applied(tmp_path):
    norms = []

    class SGDRegression(Regression):
        def configure_optimizer(self):
            return torch.optim.SGD(self.model.parameters(), lr=1.0)

    from paperloop.callbacks import LambdaCallback
    spy = LambdaCallback(on_batch_end=lambda t, o: norms.append(float(o["optim/grad_norm"])))
    cfg = TrainerConfig(max_steps=1, batch_size=8, max_grad_norm=0.5, output_dir=str(tmp_path))
    t = SGDRegression(make_model(dropout=0.0), cfg, train_data=make_data(32), callbacks=[spy])
    before = weights(t.model)
    t.fit()
    assert norms[0] > 0.5  # the reported norm is the one before clipping
    update = torch.cat([(weights(t.model)[k] - before[k]).flatten() for k in before])
    assert update.norm().item() == pytest.approx(0.5, rel=1e-4)  # SGD with lr 1 moves by the clipped gradient


def test_nonfinite_loss_never_reaches_the_weights(tmp_path):
    seen = {}

    class NaNAtStep2(Regression):
        def training_step(self, batch):
            loss = super().training_step(batch)
            if self.state.global_step == 2:
                seen["before"] = weights(self.model)
                return loss * float("nan")
            return loss

    t = NaNAtStep2(make_model(), TrainerConfig(max_epochs=3, batch_size=8, output_dir=str(tmp_path)),
                   train_data=make_data(40), callbacks=[TerminateOnNonFinite()])
    state = t.fit()
    assert state.should_stop and "non-finite" in state.stop_reason and state.global_step == 3
    assert_bitwise_equal(weights(t.model), seen["before"])


def test_a_run_whose_every_update_was_skipped_is_an_error_not_a_success(tmp_path):
    """A NaN setting (lora.alpha=nan before configs refused it, a NaN input) makes every update non-finite: the
    run trains nothing, and fit() must not return as if it had."""
    class AlwaysNaN(Regression):
        def training_step(self, batch):
            return super().training_step(batch) * float("nan")

    t = AlwaysNaN(make_model(), TrainerConfig(max_steps=4, batch_size=8, output_dir=str(tmp_path)),
                  train_data=make_data(40))
    with pytest.raises(RuntimeError, match=r"all 4 steps of this fit\(\) were skipped"):
        t.fit()
    assert t.state.updates == 0

    # resumed from a checkpoint that trained: this fit's steps count, not the run's
    good = Regression(make_model(), TrainerConfig(max_steps=3, batch_size=8, checkpoint_every_steps=3,
                                                  output_dir=str(tmp_path / "resumed")), train_data=make_data(40))
    good.fit()
    t = AlwaysNaN(make_model(), TrainerConfig(max_steps=5, batch_size=8, output_dir=str(tmp_path / "resumed")),
                  train_data=make_data(40))
    with pytest.raises(RuntimeError, match=r"all 2 steps of this fit\(\) were skipped"):
        t.fit(resume="latest")
    assert t.state.updates == 3


def test_a_generic_dataset_goes_through_collate(tmp_path):
    class Pairs(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"x": torch.full((4,), float(i)), "y": torch.tensor([float(i)])}

    class DictRegression(BaseTrainer):
        def training_step(self, batch):
            return F.mse_loss(self.model(batch["x"]), batch["y"])

    t = DictRegression(make_model(), TrainerConfig(batch_size=5, output_dir=str(tmp_path)), train_data=Pairs())
    assert t.fit().global_step == 3


def test_user_errors_are_clear(tmp_path):
    cfg = TrainerConfig(output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="training_step"):
        BaseTrainer(make_model(), cfg)  # abstract: no training_step
    with pytest.raises(ValueError, match="train_data is empty"):
        Regression(make_model(), cfg, train_data=TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1)))
    with pytest.raises(ConfigError, match="^val_every: set to 2 but no val_data"):
        Regression(make_model(), TrainerConfig(val_every=2), train_data=make_data())
    with pytest.raises(TypeError, match="map-style dataset"):
        Regression(make_model(), cfg, train_data=iter([1, 2, 3]))
    with pytest.raises(ValueError, match="no val_data"):
        Regression(make_model(), cfg, train_data=make_data()).validate()

    class ReturnsFloat(Regression):
        def training_step(self, batch):
            return 1.0

    with pytest.raises(TypeError, match="must return a loss tensor or a dict with a 'loss' tensor; got float"):
        ReturnsFloat(make_model(), cfg, train_data=make_data()).fit()

    class ReturnsVector(Regression):
        def training_step(self, batch):
            return F.mse_loss(self.model(batch[0]), batch[1], reduction="none")

    with pytest.raises(ValueError, match="reduce it to a scalar"):
        ReturnsVector(make_model(), cfg, train_data=make_data()).fit()


def test_evaluation_and_data_mistakes_get_errors_naming_what_to_fix(tmp_path):
    cfg = TrainerConfig(batch_size=4, output_dir=str(tmp_path))

    class PerSample(Regression):
        def validation_step(self, batch):
            x, y = batch
            return {"err": (self.model(x) - y).abs().squeeze(1)}  # (B,): not reduced

    with pytest.raises(ValueError, match=r"PerSample.validation_step returned 'err' of shape \(4,\)"):
        PerSample(make_model(), cfg, train_data=make_data(8), val_data=make_data(8)).validate()

    class Named(Regression):
        def validation_step(self, batch):
            return {"loss": torch.tensor(1.0), "split": "val"}

    with pytest.raises(TypeError, match="Named.validation_step returned 'split' as a str"):
        Named(make_model(), cfg, train_data=make_data(8), val_data=make_data(8)).validate()

    class Ragged(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.zeros(1 + i % 3), torch.zeros(1)

    with pytest.raises(ValueError, match="different shapes.*write a `collate"):
        Regression(make_model(), cfg, train_data=Ragged()).fit()

    class Frozen(Regression):
        def training_step(self, batch):
            with torch.no_grad():
                return super().training_step(batch)

    with pytest.raises(RuntimeError, match="the loss does not require grad"):
        Frozen(make_model(), cfg, train_data=make_data(8)).fit()


def test_a_changed_seed_on_resume_is_refused_before_anything_is_loaded(tmp_path):
    first = Regression(make_model(), TrainerConfig(max_epochs=1, batch_size=8, output_dir=str(tmp_path)),
                       train_data=make_data(16))
    first.fit()
    path = first.save_checkpoint()
    other = Regression(make_model(seed=1), TrainerConfig(batch_size=8, seed=5, output_dir=str(tmp_path)),
                       train_data=make_data(16))
    before = weights(other.model)
    with pytest.raises(CheckpointError, match=f"^{path / 'trainer_state.json'}: data plan: .*seed 0, this run seed 5"):
        other.load_checkpoint(path)
    assert_bitwise_equal(weights(other.model), before)



def test_setup_is_made_once_and_setup_again_makes_it_anew_from_the_config(tmp_path):
    t = make_resume_trainer(tmp_path)
    t.setup()
    optimizer, plan = t.optimizer, t.plan
    t.state_dict()  # every entry point sets up; once made, nothing is made again
    t.setup()
    assert t.optimizer is optimizer and t.plan is plan
    t.config = dataclasses.replace(t.config, lr=0.5)
    t.setup_again()
    assert t.optimizer is not optimizer and t.plan is not plan
    assert t.optimizer.param_groups[0]["lr"] == 0.5

def lrs_seen(tmp_path, cls=Regression, val_data=None, **cfg):
    from paperloop.callbacks import LambdaCallback

    seen = []
    spy = LambdaCallback(on_batch_end=lambda t, o: seen.append((t.state.epoch, o["optim/lr"])))
    config = TrainerConfig(**{"batch_size": 8, "lr": 0.1, "output_dir": str(tmp_path), **cfg})
    t = cls(make_model(), config, train_data=make_data(32), val_data=val_data, callbacks=[spy])
    t.fit()
    return seen, t


def test_config_schedules_warm_up_then_follow_transformers(tmp_path):
    import math

    seen, t = lrs_seen(tmp_path / "cos", max_steps=12, lr_scheduler="cosine", warmup_steps=4)
    lrs = [lr for _, lr in seen]  # the lr each update used: 4 steps an epoch, 3 epochs
    expected = [0.1 * u / 4 for u in range(4)] + [0.1 * 0.5 * (1 + math.cos(math.pi * (u - 4) / 8)) for u in range(4, 12)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert t.state.epoch == 3  # max_steps alone decides the length
    seen, _ = lrs_seen(tmp_path / "lin", max_steps=10, lr_scheduler="linear", warmup_ratio=0.2)
    assert [lr for _, lr in seen] == pytest.approx([0, 0.05] + [0.1 * (10 - u) / 8 for u in range(2, 10)], abs=1e-12)
    seen, _ = lrs_seen(tmp_path / "min", max_steps=9, lr_scheduler="cosine_with_min_lr", min_lr_ratio=0.1)
    assert seen[-1][1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 8 / 9)))
    with pytest.raises(ConfigError, match="^lr_scheduler: must be one of"):
        TrainerConfig(lr_scheduler="cosine_annealing")
    with pytest.raises(ConfigError, match="^warmup_ratio: .* set one of them"):
        TrainerConfig(warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="^warmup_steps: 12 warmup updates leave none"):
        lrs_seen(tmp_path / "w", max_steps=12, lr_scheduler="linear", warmup_steps=12)


def test_per_epoch_and_plateau_schedulers(tmp_path):
    class PerEpoch(Regression):
        def configure_scheduler(self, optimizer):
            return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), "interval": "epoch"}

    seen, _ = lrs_seen(tmp_path / "e", PerEpoch, max_epochs=3)
    assert seen == [(e, pytest.approx(0.1 * 0.5 ** e)) for e in range(3) for _ in range(4)]

    class Plateau(Regression):
        def validation_step(self, batch):
            return {"loss": torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0][self.state.epoch - 1])}

        def configure_scheduler(self, optimizer):
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
            return {"scheduler": plateau, "interval": "epoch", "monitor": "val/loss"}

    seen, _ = lrs_seen(tmp_path / "p", Plateau, val_data=make_data(8), max_epochs=5)
    # val/loss 3, 2 (better), 2 (1 bad epoch: within patience), 2 (2 bad epochs: halve): epoch 5 runs at half
    assert [lr for e, lr in seen[::4]] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05])

    class BarePlateau(Regression):
        def configure_scheduler(self, optimizer):
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)

    with pytest.raises(ValueError, match="ReduceLROnPlateau steps on a metric once an epoch closes"):
        lrs_seen(tmp_path / "b", BarePlateau)


def test_max_steps_alone_decides_the_length_and_with_max_epochs_the_first_wins(tmp_path):
    _, t = fit_weights(tmp_path / "a", n=40, batch_size=8, max_epochs=None, max_steps=13)
    assert (t.state.global_step, t.state.epoch) == (13, 2)
    _, t = fit_weights(tmp_path / "b", n=40, batch_size=8, max_epochs=2, max_steps=13)
    assert (t.state.global_step, t.state.epoch) == (10, 2)
    _, t = fit_weights(tmp_path / "c", n=40, batch_size=8, max_epochs=None)
    assert (t.state.global_step, t.state.epoch) == (5, 1)  # neither: one epoch

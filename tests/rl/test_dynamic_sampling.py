"""DAPO's dynamic sampling draws on into the next epoch: a step trains tied groups only when max_sample_rounds is
spent, and a run killed or stopped where a step's draws crossed an epoch's end resumes exactly."""

import torch

from paperloop.callbacks import LambdaCallback

from tests.support.rl import first_digit_reward, make_rl_trainer

# 16 prompts, 4 a step: an epoch is 4 steps, and about 3 groups in 10 have a spread at the start, so most steps need
# more rounds than the epoch has left
RUN = dict(prompts=16, dynamic_sampling=True, max_sample_rounds=5, max_steps=6, max_epochs=None,
           reward_fns=(first_digit_reward,), checkpoint_every_steps=1)


def test_a_step_trains_tied_groups_only_when_its_rounds_are_spent_even_at_an_epochs_end(tmp_path):
    outputs, drawn = [], []
    trainer = make_rl_trainer(tmp_path, callbacks=[LambdaCallback(on_batch_end=lambda t, o: outputs.append(o))], **RUN)
    rollout = trainer.rollout
    trainer.rollout = lambda indices: drawn.append(indices.tolist()) or rollout(indices)
    trainer.fit()
    rounds = [o["rollout/sample_rounds"] for o in outputs]
    assert all(float(o["rollout/zero_std_frac"]) == 0 or r == 5 for o, r in zip(outputs, rounds)), rounds
    # the draws crossed epochs: 6 steps took more than the 4 steps of prompts an epoch holds, and epochs closed
    assert sum(rounds) > 8 and trainer.state.epoch >= 2
    # every prompt drawn once an epoch, in the plan's order, none skipped: the epochs' steps one after the other
    plan_order = [step.tolist() for epoch in range(trainer.state.epoch + 2) for step in trainer.plan.epoch_steps(epoch)]
    assert drawn == plan_order[:len(drawn)]


def test_a_resume_where_a_step_drew_from_the_next_epoch_is_exact(tmp_path):
    straight = make_rl_trainer(tmp_path / "straight", **RUN)
    straight.fit()
    for stop_at in (2, 3, 4):
        stop = LambdaCallback(on_batch_end=lambda t, o, k=stop_at: t.state.global_step == k
                              and t.request_stop("test preemption", resumable=True))
        make_rl_trainer(tmp_path / f"resumed{stop_at}", callbacks=[stop], **RUN).fit()
        resumed = make_rl_trainer(tmp_path / f"resumed{stop_at}", **RUN)
        resumed.fit(resume="latest")
        assert (resumed.state.epoch, resumed.plan.offset) == (straight.state.epoch, straight.plan.offset)
        for name, value in straight.unwrapped_model.state_dict().items():
            assert torch.equal(resumed.unwrapped_model.state_dict()[name], value), (stop_at, name)

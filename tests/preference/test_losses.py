"""The preference losses against TRL's (DPOTrainer's `sigmoid`, `robust`, `hinge`, `ipo`, `sft`, a weighted
combination; CPOTrainer's `simpo`): the loss and its gradient with respect to every per-token log-prob, on fixed
inputs, to 1e-6 (float64: they agree to rounding). TRL's numbers are in trl_preference_reference.json, written by
make_trl_reference.py where TRL is installed."""

import json
from pathlib import Path

import pytest
import torch

from paperloop.preference import PREFERENCE_LOSSES, PairLogps, bradley_terry_loss, preference_loss, register_preference_loss
from paperloop.preference.losses import loss_traits

REFERENCE = json.loads(Path(__file__).with_name("trl_preference_reference.json").read_text())


def ours(case: dict) -> tuple[float, torch.Tensor]:
    per_token = torch.tensor(REFERENCE["per_token"], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(REFERENCE["mask"], dtype=torch.float64)
    sums, lengths = (per_token * mask).sum(1), mask.sum(1)
    P = len(sums) // 2
    pairs = PairLogps(sums[:P], sums[P:], torch.tensor(REFERENCE["ref_chosen"], dtype=torch.float64),
                      torch.tensor(REFERENCE["ref_rejected"], dtype=torch.float64), lengths[:P], lengths[P:])
    settings = {k: case[k] for k in ("beta", "label_smoothing", "simpo_gamma") if k in case}
    loss, _ = preference_loss(pairs, tuple(case["loss_type"]), case.get("loss_weights"), **settings)
    return loss.item(), torch.autograd.grad(loss, per_token)[0]


@pytest.mark.parametrize("name", sorted(k for k in REFERENCE["cases"] if not k.startswith("reward_model")))
def test_each_loss_and_its_gradient_match_trls(name):
    case = REFERENCE["cases"][name]
    loss, grad = ours(case)
    assert loss == pytest.approx(case["loss"], abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor(case["grad"], dtype=torch.float64), rtol=0, atol=1e-6)
    assert grad.abs().max() > 1e-3  # a loss that moves nothing would match a zero gradient


def test_ipo_sums_its_log_ratios_when_asked_as_openrlhf_does():
    pairs = PairLogps(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.0]),
                      torch.tensor([4.0]), torch.tensor([2.0]))
    normalized, _ = preference_loss(pairs, ("ipo",), beta=0.5)
    summed, _ = preference_loss(pairs, ("ipo",), beta=0.5, ipo_normalize_length=False)
    assert normalized.item() == pytest.approx((1 / 4 - (-1) / 2 - 1) ** 2)
    assert summed.item() == pytest.approx((1 - (-1) - 1) ** 2)


def test_metrics_are_trls_implicit_rewards():
    pairs = PairLogps(torch.tensor([-4.0, -2.0]), torch.tensor([-6.0, -1.0]), torch.tensor([-5.0, -2.0]),
                      torch.tensor([-5.0, -2.0]), torch.ones(2), torch.ones(2))
    _, metrics = preference_loss(pairs, beta=0.5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 * (1 + 0) / 2)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.5 * (-1 + 1) / 2)
    assert metrics["rewards/accuracies"].item() == 0.5 and metrics["rewards/margins"].item() == pytest.approx(0.25)
    assert metrics["logps/chosen"].item() == -3.0 and metrics["logps/rejected"].item() == -3.5


def test_a_new_variant_is_a_registered_name_and_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'sigmoid' is taken"):
        register_preference_loss("sigmoid")(lambda pairs, options: pairs.chosen)

    @register_preference_loss("test_margin_only", reads=("beta",))
    def margin_only(pairs, options):
        return -options.beta * pairs.delta()
    try:
        pairs = PairLogps(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]),
                          torch.ones(1), torch.ones(1))
        loss, _ = preference_loss(pairs, ("test_margin_only",), beta=2.0)
        assert loss.item() == pytest.approx(-2.0)
        assert loss_traits("test_margin_only").reads == ("beta",)
    finally:
        del PREFERENCE_LOSSES["test_margin_only"]


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_the_reward_model_loss_and_its_gradient_match_trls(center):
    """RewardTrainer's Bradley-Terry loss with per-pair margins, and with centring."""
    case = REFERENCE["cases"][f"reward_model center={center}"]
    rewards = torch.tensor(REFERENCE["rewards"], dtype=torch.float64, requires_grad=True)
    chosen, rejected = rewards.chunk(2)
    loss = bradley_terry_loss(chosen, rejected, torch.tensor(REFERENCE["margins"], dtype=torch.float64), center)
    assert loss.item() == pytest.approx(case["loss"], abs=1e-6)
    grad = torch.autograd.grad(loss, rewards)[0]
    torch.testing.assert_close(grad, torch.tensor(case["grad"], dtype=torch.float64), rtol=0, atol=1e-6)

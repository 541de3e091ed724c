"""Writes trl_preference_reference.json: TRL's preference losses and their gradients on fixed inputs, which
test_preference_losses.py matches (so the tests run without TRL). Run where TRL is installed (the `bench` extra):

    python tests/preference/make_trl_reference.py     # TRL 1.16.0 made the file in the repository

TRL's DPOTrainer computes its losses inside `_compute_loss`, from the model's per-token log-probs: a stand-in model
returns fixed ones (a leaf tensor, for the gradient), and a stand-in trainer holds the settings `_compute_loss` reads.
SimPO is CPOTrainer's `cpo_loss`, on length-averaged log-probs. The reward model's loss is RewardTrainer's
`compute_loss`, on fixed rewards (a stand-in model returns them), with margins and centring."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl import DPOTrainer, RewardTrainer
from trl.experimental.cpo import CPOTrainer

P, L = 4, 6  # pairs, positions
g = torch.Generator().manual_seed(0)
PER_TOKEN = (-3 * torch.rand(2 * P, L - 1, generator=g, dtype=torch.float64)).tolist()
MASK = [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1],  # chosen completions' positions
        [0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 0, 0, 0]]  # rejected (contiguous per row)
REF_CHOSEN = (-3 * torch.rand(P, generator=g, dtype=torch.float64)).tolist()
REF_REJECTED = (-3 * torch.rand(P, generator=g, dtype=torch.float64)).tolist()
CASES = {"sigmoid": dict(loss_type=["sigmoid"], beta=0.1, label_smoothing=0.0),
         "robust": dict(loss_type=["robust"], beta=0.3, label_smoothing=0.1),
         "hinge": dict(loss_type=["hinge"], beta=2.0, label_smoothing=0.0),
         "ipo": dict(loss_type=["ipo"], beta=0.5, label_smoothing=0.0),
         "sft": dict(loss_type=["sft"], beta=0.1, label_smoothing=0.0),
         "sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1, label_smoothing=0.0)}


class Metrics(dict):
    def __missing__(self, key):
        self[key] = value = []
        return value


def trl_dpo(case: dict) -> tuple[float, list]:
    per_token = torch.tensor(PER_TOKEN, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0] + row for row in MASK])  # completion_mask over the L input positions
    outputs = SimpleNamespace(log_probs=per_token * mask[:, 1:], entropy=torch.zeros(2 * P, L - 1),
                              mean_logits=torch.zeros(2 * P, L - 1), is_top1=torch.zeros(2 * P, L - 1, dtype=torch.bool))
    model = lambda **kwargs: outputs  # noqa: E731
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                           precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", use_weighting=False,
                           loss_types=case["loss_type"], loss_weights=case.get("loss_weights", [1.0]),
                           beta=case["beta"], label_smoothing=case["label_smoothing"], _metrics={"train": Metrics()},
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * P, L, dtype=torch.long), "attention_mask": torch.ones(2 * P, L),
              "completion_mask": mask, "ref_chosen_logps": torch.tensor(REF_CHOSEN, dtype=torch.float64),
              "ref_rejected_logps": torch.tensor(REF_REJECTED, dtype=torch.float64)}
    loss = DPOTrainer._compute_loss(fake, model, inputs, False)
    return loss.item(), torch.autograd.grad(loss, per_token)[0].tolist()


def trl_simpo(beta: float, gamma: float, label_smoothing: float) -> tuple[float, list]:
    per_token = torch.tensor(PER_TOKEN, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(MASK, dtype=torch.float64)
    average = (per_token * mask).sum(1) / mask.sum(1)  # CPO's average_log_prob=True for simpo
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=label_smoothing,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, _, _ = CPOTrainer.cpo_loss(fake, average[:P], average[P:])
    loss = losses.mean()
    return loss.item(), torch.autograd.grad(loss, per_token)[0].tolist()


REWARDS = (2 * torch.rand(2 * P, generator=g, dtype=torch.float64) - 1).tolist()  # chosen rows, then rejected
MARGINS = [0.0, 0.5, -0.25, 1.0]


def trl_reward(center: float) -> tuple[float, list]:
    rewards = torch.tensor(REWARDS, dtype=torch.float64, requires_grad=True)
    model = lambda **kwargs: SimpleNamespace(logits=rewards[:, None])  # noqa: E731
    accelerator = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=center),
                           accelerator=accelerator, _metrics={"train": Metrics()}, _total_train_tokens=0, _tp_size=1)
    inputs = {"margin": torch.tensor(MARGINS, dtype=torch.float64), "attention_mask": torch.ones(2 * P, 3)}
    loss = RewardTrainer.compute_loss(fake, model, inputs)
    return loss.item(), torch.autograd.grad(loss, rewards)[0].tolist()


if __name__ == "__main__":
    reference = {"trl": trl.__version__, "per_token": PER_TOKEN, "mask": MASK, "ref_chosen": REF_CHOSEN,
                 "ref_rejected": REF_REJECTED, "cases": {}}
    for name, case in CASES.items():
        loss, grad = trl_dpo(case)
        reference["cases"][name] = {**case, "loss": loss, "grad": grad}
    loss, grad = trl_simpo(2.0, 0.8, 0.1)
    reference["cases"]["simpo"] = {"loss_type": ["simpo"], "beta": 2.0, "simpo_gamma": 0.8, "label_smoothing": 0.1,
                                   "loss": loss, "grad": grad}
    reference["rewards"], reference["margins"] = REWARDS, MARGINS
    for center in (0.0, 0.01):
        loss, grad = trl_reward(center)
        reference["cases"][f"reward_model center={center}"] = {"loss_type": ["bradley_terry"],
                                                                "center_rewards_coefficient": center,
                                                                "loss": loss, "grad": grad}
    Path(__file__).with_name("trl_preference_reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print({name: round(case["loss"], 6) for name, case in reference["cases"].items()})

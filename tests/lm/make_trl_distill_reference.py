"""Writes trl_distill_reference.json: TRL's generalized JSD (GKD's loss, `GKDTrainer.generalized_jsd_loss`) and its
gradient in the student's logits on fixed inputs, for several β, which test_distill.py matches (so the tests run
without TRL). Run where TRL is installed (the `bench` extra):

    python tests/lm/make_trl_distill_reference.py     # TRL 1.16.0 made the file in the repository

The inputs are logits of shape (2, 5, 7) in float64, positions with label -100 left out (TRL's mask); the loss is
TRL's `batchmean`: the sum over the kept positions / their count."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import trl
from trl.experimental.gkd import GKDTrainer

g = torch.Generator().manual_seed(0)
STUDENT = (2 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)).tolist()
TEACHER = (3 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)).tolist()
LABELS = [[-100, 3, 1, 6, -100], [-100, -100, 0, 2, 5]]
BETAS = [0.0, 0.3, 0.5, 0.9, 1.0]


def main() -> None:
    cases = []
    for beta in BETAS:
        student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
        loss = GKDTrainer.generalized_jsd_loss(student, torch.tensor(TEACHER, dtype=torch.float64),
                                               labels=torch.tensor(LABELS), beta=beta)
        loss.backward()
        cases.append({"beta": beta, "loss": loss.item(), "grad": student.grad.tolist()})
    out = {"trl_version": trl.__version__, "student": STUDENT, "teacher": TEACHER, "labels": LABELS, "cases": cases}
    Path(__file__).with_name("trl_distill_reference.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()

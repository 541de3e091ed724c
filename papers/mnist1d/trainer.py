"""Classification trainer for MNIST-1D: cross-entropy to train, loss and accuracy (%) to evaluate."""

import torch.nn.functional as F

from paperloop import BaseTrainer


class Classifier(BaseTrainer):
    def training_step(self, batch):
        x_B_L, y_B = batch
        return F.cross_entropy(self.model(x_B_L), y_B)

    def validation_step(self, batch):
        x_B_L, y_B = batch
        logits_B_C = self.model(x_B_L)
        return {"loss": F.cross_entropy(logits_B_C, y_B), "acc": (logits_B_C.argmax(-1) == y_B).float().mean() * 100}

"""The Grokking trainer: SFTTrainer with the paper's AdamW betas, and accuracy on both splits at each validation."""

import torch

from paperloop import SFTTrainer


class GrokkingTrainer(SFTTrainer):
    def configure_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.config.lr, betas=tuple(self.config.betas),
                                 weight_decay=self.config.weight_decay)

    def validate(self) -> dict:
        # Accuracy: the answer and EOS are the greedy continuation of `a ∘ b =` (exact match over trained
        # tokens). The training split is measured the same way, in the same pass, for Figure 1's train curve.
        val = self.evaluate(self.val_data, "val")
        train = self.evaluate(self.train_data, "train")
        return {"val/loss": val["val/loss"], "val/acc": 100 * val["val/exact_match"],
                "val/train_loss": train["train/loss"], "val/train_acc": 100 * train["train/exact_match"]}

"""Small classifiers for 1-D signals, sized as the MNIST-1D paper's reference models
(Greydanus 2020, github.com/greydanus/mnist1d `models.py`). Input: (B, L) signals; output: (B, C) logits."""

from __future__ import annotations

import torch
from torch import nn


def logistic(length: int = 40, classes: int = 10) -> nn.Module:
    return nn.Linear(length, classes)


class ResidualMLP(nn.Module):
    """Two hidden layers of `hidden` units; the second adds its input back (as in the paper's code)."""

    def __init__(self, length: int = 40, classes: int = 10, hidden: int = 100):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(length, hidden), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x_B_L: torch.Tensor) -> torch.Tensor:
        h_B_H = self.linear1(x_B_L).relu()
        h_B_H = h_B_H + self.linear2(h_B_H).relu()
        return self.head(h_B_H)


class ConvNet1d(nn.Module):
    """Three strided convolutions (kernels 5, 3, 3; stride 2) of `channels`, flattened to a linear head."""

    def __init__(self, length: int = 40, classes: int = 10, channels: int = 25):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(1, channels, 5, stride=2, padding=1),
                                    nn.Conv1d(channels, channels, 3, stride=2, padding=1),
                                    nn.Conv1d(channels, channels, 3, stride=2, padding=1)])
        out_len = length
        for conv in self.convs:
            out_len = (out_len + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        self.head = nn.Linear(channels * out_len, classes)  # 25 * 5 = 125 for length 40

    def forward(self, x_B_L: torch.Tensor) -> torch.Tensor:
        h = x_B_L.unsqueeze(1)  # (B, 1, L)
        for conv in self.convs:
            h = conv(h).relu()  # (B, C, L') with L' halving each layer
        return self.head(h.flatten(1))


class GRUClassifier(nn.Module):
    """A bidirectional GRU over the signal's positions; all its outputs, flattened, feed a linear head."""

    def __init__(self, length: int = 40, classes: int = 10, hidden: int = 6, bidirectional: bool = True):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(length * hidden * (2 if bidirectional else 1), classes)

    def forward(self, x_B_L: torch.Tensor) -> torch.Tensor:
        out_B_L_D, _ = self.gru(x_B_L.unsqueeze(-1))  # D = hidden * directions
        return self.head(out_B_L_D.flatten(1))


BUILDERS = {"logistic": logistic, "mlp": ResidualMLP, "cnn": ConvNet1d, "gru": GRUClassifier}


def build_classifier(name: str, length: int = 40, classes: int = 10) -> nn.Module:
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[name](length, classes)

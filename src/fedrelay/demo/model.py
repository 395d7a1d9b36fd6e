"""A small CNN for single-channel chest-X-ray-like images, sized for CPU simulations."""

from __future__ import annotations

import torch
from torch import nn


class PneumoniaCNN(nn.Module):
    """Three conv layers and a linear head; one logit (pneumonia vs normal).

    Each image is standardised on its own (no statistics to share or leak between clients), and
    global max pooling keeps the strongest local finding (a consolidation is a local bright patch)
    while making the net independent of the image size: the same weights fit generated 32x32
    images and resized real X-rays. No BatchNorm: its running statistics are buffers that FedAvg
    would average across clients with different data.
    """

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
        )
        self.head = nn.Linear(2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return self.head(self.features((x - mean) / std).flatten(1)).squeeze(1)

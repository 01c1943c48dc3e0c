"""DeepSets jet classifier (Zaheer et al. 2017; Komiske et al. 2019 'Energy Flow Networks').

Per-constituent network Phi, masked sum over constituents, then F. Paper sizes (OmniJet-α fig 5):
Phi = 100, 100, 256; F = 3 x 100.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["DeepSetsConfig", "DeepSets"]


@dataclass
class DeepSetsConfig:
    n_features: int = 3
    n_classes: int = 10
    phi: list = field(default_factory=lambda: [100, 100, 256])
    f: list = field(default_factory=lambda: [100, 100, 100])
    dropout: float = 0.0


def _mlp(sizes, dropout=0.0):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


class DeepSets(nn.Module):
    def __init__(self, config: DeepSetsConfig | None = None):
        super().__init__()
        self.config = config = config or DeepSetsConfig()
        self.phi = _mlp([config.n_features, *config.phi], config.dropout)
        self.f = _mlp([config.phi[-1], *config.f], config.dropout)
        self.out = nn.Linear(config.f[-1], config.n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.phi(x)                                   # (B, N, P)
        h = (h * mask.unsqueeze(-1)).sum(dim=1)           # (B, P): padding contributes nothing
        return self.out(self.f(h))                        # (B, C) logits

"""EPiC-FM: the velocity network of a flow-matching jet generator on continuous constituents.

Written from the description of EPiC-FM (Buhmann et al. 2023, arXiv 2310.00049; trained on
JetClass in Birk et al. 2023, arXiv 2312.00123), the continuous baseline OmniJet-α compares
with (paper fig. 14). No tokens: the network sees the constituent features themselves.

An EPiC ("equivariant point cloud") layer keeps one vector per point (B, N, H) and one global
vector per jet (B, L). Each layer

* updates the global vector from the masked mean and 0.01 × masked sum of the points,
* updates every point from itself and the new global vector,

both with two weight-normalised linear maps, leaky ReLU and a residual connection. The flow
time (32-dim cosine embedding) and the jet condition (class one-hot, jet pT, jet η) are
concatenated to the input of every linear map. Everything per point is permutation
equivariant; padded points never enter a pooled quantity, so their values cannot change the
output of real points.

``EPiCNet(config)(x_t, t, cond, mask)`` returns the velocity v(x_t, t | cond), shape (B, N, 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["EPiCConfig", "EPiCNet", "EPiCLayer", "cosine_time_embedding", "make_condition"]


@dataclass
class EPiCConfig:
    n_features: int = 3          # (log pT, η_rel, φ_rel), standardised
    hidden: int = 128            # per-point width
    latent: int = 10             # global vector width
    n_layers: int = 6            # EPiC layers
    time_dim: int = 32           # cosine time embedding
    n_classes: int = 10          # jet class one-hot
    n_jet_features: int = 2      # jet pT, jet η (standardised)
    sum_scale: float = 0.01      # pooled = [mean, sum_scale * sum]
    negative_slope: float = 0.01  # leaky ReLU

    @classmethod
    def jetclass(cls) -> "EPiCConfig":
        """The JetClass configuration of Birk et al.: 20 layers, hidden 300, latent 16."""
        return cls(hidden=300, latent=16, n_layers=20)

    @classmethod
    def light(cls) -> "EPiCConfig":
        """A light configuration for CPUs: 6 layers, hidden 128, latent 10."""
        return cls(hidden=128, latent=10, n_layers=6)

    @property
    def cond_dim(self) -> int:
        return self.n_classes + self.n_jet_features

    @property
    def ctx_dim(self) -> int:
        """Width of what is concatenated to every layer's input: time embedding + condition."""
        return self.time_dim + self.cond_dim


def cosine_time_embedding(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) features cos(k π t), k = 1..dim.

    A cosine basis on the unit interval: smooth in t, resolves the whole trajectory, and needs
    no scale choice (the original's exact frequencies are not part of its description).
    """
    k = torch.arange(1, dim + 1, device=t.device, dtype=t.dtype)
    return torch.cos(math.pi * t[:, None] * k)  # (B, dim)


def make_condition(labels: torch.Tensor, jet_pt: torch.Tensor, jet_eta: torch.Tensor,
                   n_classes: int = 10) -> torch.Tensor:
    """(B,) class indices and (B,) already standardised jet pT, η -> (B, n_classes + 2)."""
    onehot = F.one_hot(labels.long(), n_classes).to(jet_pt.dtype)
    return torch.cat([onehot, jet_pt[:, None], jet_eta[:, None]], dim=1)


def _wn_linear(n_in: int, n_out: int) -> nn.Linear:
    return weight_norm(nn.Linear(n_in, n_out))


def _point_jet_linear(lin: nn.Linear, points: torch.Tensor, jet: torch.Tensor) -> torch.Tensor:
    """``lin(cat([points, jet broadcast to every point], -1))`` without building the broadcast.

    points (B, N, P), jet (B, J) -> (B, N, out). The per-jet part of the product is computed
    once per jet instead of once per point (same weights, same result).
    """
    w = lin.weight  # (out, P + J), weight-normalised over the full input row
    p = points.shape[-1]
    return points @ w[:, :p].T + (jet @ w[:, p:].T + lin.bias)[:, None, :]


def _masked_pool(points: torch.Tensor, mask: torch.Tensor, sum_scale: float) -> torch.Tensor:
    """(B, N, H) points, (B, N) mask -> (B, 2H) = [masked mean, sum_scale * masked sum].

    The masked sum is a batched matrix product (no masked copy of the points). Padded points
    must be finite: :class:`EPiCNet` zeroes padded inputs, so their activations are.
    """
    m = mask.to(points.dtype)[:, None, :]  # (B, 1, N)
    s = torch.bmm(m, points)[:, 0]  # (B, H)
    n = m.sum(2).clamp(min=1)  # (B, 1)
    return torch.cat([s / n, sum_scale * s], dim=1)


class EPiCLayer(nn.Module):
    """Global update from pooled points, then point update from the new global vector."""

    def __init__(self, hidden: int, latent: int, ctx: int, sum_scale: float, negative_slope: float):
        super().__init__()
        self.sum_scale = sum_scale
        self.slope = negative_slope
        self.g1 = _wn_linear(2 * hidden + latent + ctx, hidden)
        self.g2 = _wn_linear(hidden + ctx, latent)
        self.p1 = _wn_linear(hidden + latent + ctx, hidden)
        self.p2 = _wn_linear(hidden + ctx, hidden)

    def forward(self, p, g, ctx, mask):
        # p (B, N, H), g (B, L), ctx (B, C), mask (B, N)
        act = lambda z: F.leaky_relu(z, self.slope)  # noqa: E731
        pooled = _masked_pool(p, mask, self.sum_scale)  # (B, 2H)
        h = act(self.g1(torch.cat([pooled, g, ctx], 1)))  # (B, H)
        g = act(self.g2(torch.cat([h, ctx], 1)) + g)  # (B, L) residual
        h = act(_point_jet_linear(self.p1, p, torch.cat([g, ctx], 1)))  # (B, N, H)
        p = act(_point_jet_linear(self.p2, h, ctx) + p)  # (B, N, H) residual
        return p, g


class EPiCNet(nn.Module):
    """Velocity field v(x_t, t | cond) for padded point clouds."""

    def __init__(self, config: EPiCConfig):
        super().__init__()
        self.config = c = config
        self.point_in = _wn_linear(c.n_features + c.ctx_dim, c.hidden)
        self.global_in = _wn_linear(2 * c.hidden + c.ctx_dim, c.latent)
        self.layers = nn.ModuleList(
            EPiCLayer(c.hidden, c.latent, c.ctx_dim, c.sum_scale, c.negative_slope) for _ in range(c.n_layers)
        )
        self.point_out = _wn_linear(c.hidden + c.latent + c.ctx_dim, c.n_features)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, F) at time t (B,) with cond (B, n_classes + 2) and mask (B, N) -> (B, N, F);
        padded entries of the output are 0."""
        c = self.config
        act = lambda z: F.leaky_relu(z, c.negative_slope)  # noqa: E731
        m = mask[..., None]
        x = torch.where(m, x, 0.0)
        ctx = torch.cat([cosine_time_embedding(t.to(x.dtype), c.time_dim), cond.to(x.dtype)], 1)  # (B, C)
        p = act(_point_jet_linear(self.point_in, x, ctx))  # (B, N, H)
        g = act(self.global_in(torch.cat([_masked_pool(p, mask, c.sum_scale), ctx], 1)))  # (B, L)
        for layer in self.layers:
            p, g = layer(p, g, ctx, mask)
        v = _point_jet_linear(self.point_out, p, torch.cat([g, ctx], 1))  # (B, N, F)
        return torch.where(m, v, 0.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

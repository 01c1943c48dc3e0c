"""Binned tokenizer: a regular grid in the three scaled constituent features.

Token = flat cell index ``i_pt·n² + i_eta·n + i_phi`` (n = ``bins`` per feature, K = n³, e.g.
21³ = 9261 or 40³ = 64000); decoding returns the cell centre. Values outside the range fall
into the edge cells.

Default (fixed) ranges, in the scaled features of data/features.py:
* log(pT/GeV) - 1.8 in [-3.5, 5.1], i.e. pT from 0.18 GeV to 990 GeV (jets have pT < 1000 GeV);
* 3·η_rel and 3·φ_rel in [-2.4, 2.4], exactly the |η_rel|, |φ_rel| < 0.8 constituent cut.
:meth:`BinnedTokenizer.fit` replaces them by the min/max of the real entries of a data set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..io import OmnijetError
from .base import TokenizerMixin

__all__ = ["BinnedConfig", "BinnedTokenizer", "DEFAULT_LO", "DEFAULT_HI"]

DEFAULT_LO = (-3.5, -2.4, -2.4)
DEFAULT_HI = (5.1, 2.4, 2.4)


@dataclass
class BinnedConfig:
    bins: int = 21                                       # cells per feature
    lo: list = field(default_factory=lambda: list(DEFAULT_LO))
    hi: list = field(default_factory=lambda: list(DEFAULT_HI))


class BinnedTokenizer(nn.Module, TokenizerMixin):
    """Regular-grid tokenizer with the same interface as the VQ-VAEs (no training needed)."""

    kind = "binned"

    def __init__(self, config: BinnedConfig | None = None):
        super().__init__()
        self.config = cfg = config or BinnedConfig()
        if cfg.bins < 1:
            raise OmnijetError(f"bins must be positive, got {cfg.bins}")
        try:  # checked in numpy: the model is also built on the meta device (io.declared_model)
            lo, hi = np.asarray(cfg.lo, np.float32), np.asarray(cfg.hi, np.float32)
        except (TypeError, ValueError):
            lo = hi = np.zeros(0, np.float32)
        if lo.shape != (3,) or hi.shape != (3,) or not (hi > lo).all():
            raise OmnijetError(f"binned tokenizer ranges lo={cfg.lo}, hi={cfg.hi}: need 3 values each with hi > lo")
        self.register_buffer("lo", torch.tensor(lo))
        self.register_buffer("hi", torch.tensor(hi))

    @property
    def bins(self) -> int:
        return self.config.bins

    @property
    def num_codes(self) -> int:
        return self.config.bins ** 3

    def fit(self, x, mask) -> "BinnedTokenizer":
        """Set the ranges to the min/max of the real entries of ``x`` (N, L, 3)."""
        real = np.asarray(x)[np.asarray(mask, bool)]  # (n, 3)
        if len(real) == 0:
            raise OmnijetError("binned tokenizer fit: no real constituents in the data")
        lo, hi = real.min(0).astype(float), real.max(0).astype(float)
        hi = np.where(hi > lo, hi, lo + 1e-3)
        self.config.lo, self.config.hi = lo.tolist(), hi.tolist()
        self.lo.copy_(torch.as_tensor(lo, dtype=torch.float32))
        self.hi.copy_(torch.as_tensor(hi, dtype=torch.float32))
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L) long, -1 at padding."""
        n = self.bins
        cell = ((x - self.lo) / (self.hi - self.lo) * n).floor().long().clamp(0, n - 1)  # (B, L, 3)
        tok = (cell[..., 0] * n + cell[..., 1]) * n + cell[..., 2]
        return tok.masked_fill(~mask, -1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cell centres (B, L, 3); zeros at padding."""
        mask = tokens >= 0 if mask is None else mask
        n = self.bins
        t = tokens.clamp(min=0)
        cell = torch.stack([t // (n * n), (t // n) % n, t % n], dim=-1).float()  # (B, L, 3)
        x = self.lo + (cell + 0.5) * (self.hi - self.lo) / n
        return x.masked_fill(~mask[..., None], 0.0)

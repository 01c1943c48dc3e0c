"""VQ-VAE tokenizers of jet constituents: conditional (NormFormer, whole-jet context) and
unconditional (per-constituent MLP).

Both are the official OmniJet-α networks (gabbro's ``VQVAENormFormer`` and ``VQVAEMLP``), one
parameter of ours for each of theirs (``omnijet_lib/official.py`` maps the names).

Conditional (paper sizes are the defaults): Linear(3→128) → 4 NormFormer blocks (8 heads, MLP
hidden 128, SiLU, dropout 0.1, masked attention) → Linear(128→4) → quantizer → Linear(4→128)
→ 4 blocks → Linear(128→3). Unconditional: every constituent alone through a ReLU MLP,
3→128→128→128→4, quantizer, 4→128→128→128→3 (``mlp_layers`` hidden layers of ``hidden_dim``).
Padding never influences real entries: inputs are zeroed at padding, attention masks padded
keys; by default the quantizer only sees real latents (``quantize_padding``: the official
behaviour, where the padding latents join its loss, k-means and dead-code replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.normformer import NormFormerBlock, attention_key_mask
from .base import TokenizerMixin
from .quantizer import QuantizerOutput, VectorQuantizer

__all__ = ["VQVAEConfig", "VQVAE"]


@dataclass
class VQVAEConfig:
    conditional: bool = True      # NormFormer (whole jet) or per-constituent MLP
    input_dim: int = 3            # (log pT - 1.8, 3 η_rel, 3 φ_rel)
    hidden_dim: int = 128
    num_blocks: int = 4           # conditional: NormFormer blocks per encoder and per decoder
    mlp_layers: int = 3           # unconditional: hidden ReLU layers per encoder and per decoder
    num_heads: int = 8
    mlp_hidden: int = 128
    dropout: float = 0.1
    attn_dropout: float = 0.1     # on the attention weights; 0 = fused attention kernel, faster on CPU
    latent_dim: int = 4
    num_codes: int = 8192
    beta: float = 0.9
    sync_nu: float = 1.0
    affine_lr: float = 2.0
    replace_freq: int = 10        # 0: no dead-code replacement
    kmeans_init: bool = True
    quantize_padding: bool = False  # official: padding latents take part in the quantizer statistics
    half_precision_search: bool = False  # official: nearest-code search in fp16 on CUDA


class _Coder(nn.Module):
    """Linear(in→hidden) → NormFormer blocks → Linear(hidden→out), masked (conditional)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: VQVAEConfig):
        super().__init__()
        self.inp = nn.Linear(in_dim, cfg.hidden_dim)
        self.blocks = nn.ModuleList([NormFormerBlock(cfg.hidden_dim, cfg.num_heads, cfg.mlp_hidden, cfg.dropout,
                                                     attn_dropout=cfg.attn_dropout)
                                     for _ in range(cfg.num_blocks)])
        self.out = nn.Linear(cfg.hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L, in) -> (B, L, out)
        h = self.inp(x.masked_fill(~mask[..., None], 0.0))  # (B, L, H)
        keys = attention_key_mask(mask)                      # (B, 1, 1, L)
        for blk in self.blocks:
            h = blk(h, mask, keys)
        return self.out(h).masked_fill(~mask[..., None], 0.0)


class _MLPCoder(nn.Sequential):
    """Per constituent: Linear(in→hidden) ReLU, (Linear(hidden→hidden) ReLU) × (layers-1),
    Linear(hidden→out); zero at padding (unconditional)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: VQVAEConfig):
        widths = [in_dim] + [cfg.hidden_dim] * cfg.mlp_layers
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers, nn.Linear(widths[-1], out_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L, in) -> (B, L, out)
        return super().forward(x).masked_fill(~mask[..., None], 0.0)


class VQVAE(nn.Module, TokenizerMixin):
    """Encoder → :class:`VectorQuantizer` → decoder; also a tokenizer (see tokenizers/base.py)."""

    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VQVAEConfig()
        coder = _Coder if cfg.conditional else _MLPCoder
        self.encoder = coder(cfg.input_dim, cfg.latent_dim, cfg)
        self.vq = VectorQuantizer(cfg.latent_dim, cfg.num_codes, cfg.beta, cfg.sync_nu, cfg.affine_lr,
                                  cfg.replace_freq, cfg.kmeans_init,
                                  half_precision_search=cfg.half_precision_search)
        self.decoder = coder(cfg.latent_dim, cfg.input_dim, cfg)

    @property
    def kind(self) -> str:
        return "conditional" if self.config.conditional else "unconditional"

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """x (B, L, 3), mask (B, L) -> (reconstruction (B, L, 3), quantizer output)."""
        z = self.encoder(x, mask)          # (B, L, latent), 0 at padding
        q = self.vq(z, None if self.config.quantize_padding else mask)
        return self.decoder(q.z_q, mask), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L) long, -1 at padding. Always in eval mode (no dropout, no codebook updates)."""
        was = self.training
        self.eval()
        try:
            return self.vq(self.encoder(x, mask), mask).indices
        finally:
            self.train(was)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, L, 3) from tokens (B, L); zeros at padding (mask defaults to tokens >= 0)."""
        mask = tokens >= 0 if mask is None else mask
        was = self.training
        self.eval()
        try:
            zq = self.vq.effective_codebook()[tokens.clamp(min=0)]  # (B, L, latent)
            return self.decoder(zq, mask)
        finally:
            self.train(was)

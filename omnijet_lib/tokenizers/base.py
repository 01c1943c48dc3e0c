"""What every tokenizer shares: the GPT sequence vocabulary, dataset-level tokenize/reconstruct,
and safetensors save/load.

Interface of a tokenizer (``VQVAE`` conditional/unconditional, ``BinnedTokenizer``):

* ``encode(x, mask) -> tokens``: ``x`` (B, L, 3) scaled features, ``mask`` (B, L) bool;
  tokens (B, L) long in ``0 … K-1``, ``-1`` at padding.
* ``decode(tokens, mask=None) -> x`` (B, L, 3), zeros at padding (``mask`` defaults to tokens ≥ 0).
* ``to_sequence(tokens, mask) -> (seq, seq_mask)`` and ``from_sequence(seq) -> (tokens, mask)``.
* ``num_codes`` (K), ``vocab_size`` (K + 2), ``kind``.

GPT vocabulary: start = 0, code k -> k + 1, stop = K + 1. A sequence is
``[start, codes…, stop]`` of length L + 2; slots after the stop are filled with the stop id
and are False in ``seq_mask``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io import OmnijetError

__all__ = ["START_TOKEN", "TokenizerMixin", "tokenize", "reconstruct", "save_tokenizer", "load_tokenizer",
           "TOKENIZER_KINDS"]

START_TOKEN = 0
TOKENIZER_KINDS = ("conditional", "unconditional", "binned")


def _as_torch(a, name: str) -> torch.Tensor:
    """``a`` as a tensor; an array of strings or objects is one line naming ``name``."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.dtype.kind not in "biufc":
        raise OmnijetError(f"{name}: expected numbers, got {a.dtype}")
    return torch.as_tensor(a)


class TokenizerMixin:
    """Sequence conversion shared by all tokenizers; needs ``self.num_codes``."""

    @property
    def vocab_size(self) -> int:
        return self.num_codes + 2

    @property
    def stop_token(self) -> int:
        return self.num_codes + 1

    def to_sequence(self, tokens, mask=None):
        """tokens (B, L) (-1 / mask False at padding) -> (seq (B, L+2) long, seq_mask (B, L+2) bool).

        Real tokens are packed to the front in their order. numpy in -> numpy out."""
        is_np = not isinstance(tokens, torch.Tensor)
        t = _as_torch(tokens, "to_sequence: tokens")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise OmnijetError(f"to_sequence: token ids must be integers, got {t.dtype}")
        t = t.long()
        m = (t >= 0) if mask is None else _as_torch(mask, "to_sequence: mask").bool()
        if t.dim() != 2 or m.shape != t.shape:
            raise OmnijetError(f"to_sequence: tokens {tuple(t.shape)} and mask {tuple(m.shape)} must be (B, L)")
        bad = m & ((t < 0) | (t >= self.num_codes))
        if bad.any():
            v = int(t[bad][0])
            raise OmnijetError(f"to_sequence: token id {v} out of range 0..{self.num_codes - 1}")
        B, L = t.shape
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)  # real entries first
        t, m = t.gather(1, order), m.gather(1, order)
        n = m.sum(1)                                                     # (B,)
        seq = torch.full((B, L + 2), self.stop_token, dtype=torch.long, device=t.device)
        seq[:, 0] = START_TOKEN
        seq[:, 1:L + 1] = torch.where(m, t + 1, self.stop_token)
        pos = torch.arange(L + 2, device=t.device)
        seq_mask = pos[None, :] <= (n + 1)[:, None]                    # start, codes, stop
        if is_np:
            return seq.numpy(), seq_mask.numpy()
        return seq, seq_mask

    def from_sequence(self, seq):
        """seq (B, S) ids -> (tokens (B, W) long with -1 at padding, mask (B, W) bool).

        Each row must begin with the start id; it is read up to its first stop id (or the end);
        W is the longest row. Ids before the stop must be codes 1…K; anything else raises
        :class:`OmnijetError`. numpy in -> numpy out."""
        is_np = not isinstance(seq, torch.Tensor)
        s = _as_torch(seq, "from_sequence: seq")
        if s.dim() != 2 or s.shape[1] < 1:
            raise OmnijetError(f"from_sequence: expected (B, S) ids, got shape {tuple(s.shape)}")
        if s.is_floating_point():
            raise OmnijetError("from_sequence: token ids must be integers")
        s = s.long()
        K, stop = self.num_codes, self.stop_token
        if (s[:, 0] != START_TOKEN).any():
            row = int((s[:, 0] != START_TOKEN).nonzero()[0])
            raise OmnijetError(f"from_sequence: row {row} begins with id {int(s[row, 0])}, expected start id 0")
        body = s[:, 1:]                                                  # (B, S-1)
        is_stop = body == stop
        pos = torch.arange(body.shape[1], device=s.device)
        first_stop = torch.where(is_stop, pos, body.shape[1]).min(1).values if body.numel() else \
            torch.zeros(len(s), dtype=torch.long)
        real = pos[None, :] < first_stop[:, None]                        # before the stop
        bad = real & ((body < 1) | (body > K))
        after = ~real & ~is_stop & ((body < -1) | (body > stop))
        if (bad | after).any():
            r, c = (bad | after).nonzero()[0].tolist()
            raise OmnijetError(f"from_sequence: id {int(body[r, c])} at row {r}, position {c + 1} is not a "
                               f"code (1..{K}) for vocabulary size {self.vocab_size}")
        W = int(first_stop.max()) if len(s) else 0
        tokens = torch.where(real, body - 1, -1)[:, :W]
        mask = real[:, :W]
        if is_np:
            return tokens.numpy(), mask.numpy()
        return tokens, mask


# --------------------------------------------------------------------------- dataset level
def _device_of(tok) -> torch.device:
    for t in list(tok.parameters()) + list(tok.buffers()):
        return t.device
    return torch.device("cpu")


def _check_padded(x, mask, name="x"):
    """Padded features as :func:`~omnijet_lib.data.to_padded` makes them: (N, L, 3) numbers, a
    (N, L) mask of 0/1 with each jet's real entries first, finite values at the real entries."""
    x, mask = np.asarray(x), np.asarray(mask)
    if x.dtype.kind not in "fiu" or mask.dtype.kind not in "biuf":
        raise OmnijetError(f"{name} ({x.dtype}) and mask ({mask.dtype}) must hold numbers and booleans")
    if x.ndim != 3 or x.shape[2] != 3 or mask.shape != x.shape[:2]:
        raise OmnijetError(f"{name} {x.shape} and mask {mask.shape} must be (N, L, 3) and (N, L)")
    if mask.dtype.kind != "b":
        if ((mask != 0) & (mask != 1)).any():
            raise OmnijetError(f"mask holds values other than 0 and 1 (e.g. {mask[(mask != 0) & (mask != 1)][0]})")
        mask = mask.astype(bool)
    holes = mask[:, 1:] & ~mask[:, :-1]  # a real entry after padding
    if holes.any():
        raise OmnijetError(f"mask: jet {int(np.argmax(holes.any(1)))} has padding before a real entry; "
                           f"real constituents must come first")
    bad = ~np.isfinite(x).all(-1) & mask
    if bad.any():
        raise OmnijetError(f"{name} holds NaN/inf at {int(bad.sum())} real constituents "
                           f"(first: jet {int(np.argmax(bad.any(1)))})")
    return x, mask


def _length_batches(lengths: np.ndarray, batch_size: int):
    """Index batches of jets sorted by length (longest first), each trimmed to its longest jet."""
    if batch_size <= 0:
        raise OmnijetError(f"batch_size must be positive, got {batch_size}")
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, max(int(lengths[idx[0]]), 1)


def tokenize(tokenizer, x, mask, batch_size: int = 1024) -> np.ndarray:
    """Tokens (N, L) int32 (-1 at padding) for padded features ``x`` (N, L, 3) and ``mask`` (N, L).

    Runs on the tokenizer's device in length-sorted batches trimmed to their longest jet."""
    x, mask = _check_padded(x, mask)
    dev = _device_of(tokenizer)
    lengths = mask.sum(1)
    out = np.full(mask.shape, -1, np.int32)
    for idx, L in _length_batches(lengths, batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[idx, :L], dtype=np.float32)).to(dev)
        mb = torch.from_numpy(np.ascontiguousarray(mask[idx, :L])).to(dev)
        out[idx, :L] = tokenizer.encode(xb, mb).cpu().numpy()
    return out


def reconstruct(tokenizer, tokens, mask=None, batch_size: int = 1024) -> np.ndarray:
    """Decoded features (N, L, 3) float32 (zeros at padding) from tokens (N, L).

    ``mask`` defaults to ``tokens >= 0``."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":  # 2.7 is no token id, and a cast would pick one silently
        raise OmnijetError(f"tokens: ids must be integers, got {tokens.dtype}")
    mask = tokens >= 0 if mask is None else np.asarray(mask, bool)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise OmnijetError(f"tokens {tokens.shape} and mask {mask.shape} must both be (N, L)")
    bad = mask & ((tokens < 0) | (tokens >= tokenizer.num_codes))
    if bad.any():
        raise OmnijetError(f"tokens: id {int(tokens[bad][0])} out of range 0..{tokenizer.num_codes - 1}")
    dev = _device_of(tokenizer)
    out = np.zeros((*tokens.shape, 3), np.float32)
    for idx, L in _length_batches(mask.sum(1), batch_size):
        tb = torch.from_numpy(tokens[idx, :L].astype(np.int64)).to(dev)
        mb = torch.from_numpy(np.ascontiguousarray(mask[idx, :L])).to(dev)
        out[idx, :L] = tokenizer.decode(tb, mb).cpu().numpy()
    return out


# --------------------------------------------------------------------------- save / load
def save_tokenizer(path: str | os.PathLike, tok) -> Path:
    """Weights as safetensors, the dataclass config (with ``kind``) as metadata; atomic."""
    from ..io import save_model

    return save_model(path, tok, kind=tok.kind, num_codes=tok.num_codes)


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild any tokenizer written by :func:`save_tokenizer` (eval mode)."""
    from ..io import load_checkpoint, load_model
    from .binned import BinnedConfig, BinnedTokenizer
    from .vqvae import VQVAE, VQVAEConfig

    _, meta = load_checkpoint(path)
    kind = meta.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise OmnijetError(f"{path}: not a tokenizer checkpoint (kind {kind!r}, expected one of {TOKENIZER_KINDS})")
    cls, cfg = (BinnedTokenizer, BinnedConfig) if kind == "binned" else (VQVAE, VQVAEConfig)
    model, _ = load_model(path, cls, cfg, device=str(device))
    return model.eval()

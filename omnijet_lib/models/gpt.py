"""The OmniJet-alpha generative backbone: a small GPT over jet-constituent tokens.

Sequences (from the tokenizer) are ``start 0, code+1 (1..K), stop K+1``, padded after the stop
token with ``mask == False``; the mask covers start..stop inclusive. The vocabulary is K + 2.

Architecture (paper fig. 2): token embedding (no positional embedding: the pT order is learnt
from context), ``n_layer`` post-LayerNorm blocks (attention -> residual -> LayerNorm -> MLP with
ReLU -> residual -> LayerNorm), causal self-attention, and a linear head onto the vocabulary.

Sampling. :meth:`GPT.generate_reference` is the original algorithm: recompute the whole prefix
(and the head on every position) at every one of the 128 steps. :meth:`GPT.generate` gives the
same token sequences much faster: a key/value cache (one new token per step), an early exit
once every jet has emitted stop, finished jets dropped from the active batch, an exact
inverse-CDF sampler in preallocated buffers (``torch.multinomial`` over 8193 logits costs more
than the model), single-query attention as two small matmuls, and on CPUs the head GEMM in
cache-sized column blocks. Both take their random numbers from one table ``u[jet, step]`` of uniforms
drawn up front, so with the same ``generator`` they return identical sequences. ``top_k`` restricts
each draw to the k most probable next tokens (renormalised); ``top_k=1`` is greedy decoding.
``top_p`` (nucleus sampling) to the fewest most probable tokens whose probabilities sum to at least p.

Classes. With ``n_classes`` > 0 the model can be told the jet class: a class token (id
``vocab_size + c``, :func:`insert_class_token`) right after the start token, embedded by its own
table ``class_embed`` and never predicted. Trained with some jets left without it (the class
dropout of :class:`~omnijet_lib.training.gpt.GPTModule`), one model is both the class-conditional
generator (``generate(labels=c)``) and an unconditional one (plain sequences, as every other tool
reads them): no positional embedding, so the token only adds one element to every jet's context.

Likelihood. :func:`log_likelihood` gives every jet the exact log-probability the model assigns to
its tokens, ``sum_t log p(token_t | tokens before)``, under the distribution the sampler draws from
at temperature 1 (softmax over the codes and stop; the start token is never drawn): on generated
jets it is the sum of the logs of the sampler's step probabilities.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import OmnijetError

__all__ = ["GPTConfig", "GPT", "head_cross_entropy", "sample_tokens", "draw_uniforms", "sequences_to_codes",
           "check_sequences", "log_likelihood", "insert_class_token", "target_mask"]

START = 0  # start token id; codes are shifted by +1, the stop token is vocab_size - 1
HEAD_BLOCK = 512  # vocabulary columns per head GEMM when sampling on a CPU


@dataclass
class GPTConfig:
    vocab_size: int = 8194   # K + 2 (start, K codes, stop)
    n_embd: int = 256
    n_head: int = 8
    n_layer: int = 3
    ffn: int = 1024
    dropout: float = 0.0
    max_len: int = 130       # start + 128 constituents + stop
    n_classes: int = 0       # > 0: jet classes the model can be conditioned on (a class token after start)

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise OmnijetError(f"GPT dropout must be in [0, 1), got {self.dropout}")
        if self.n_head <= 0 or self.n_embd % self.n_head:
            raise OmnijetError(f"GPT n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if not isinstance(self.n_classes, int) or self.n_classes < 0:
            raise OmnijetError(f"GPT n_classes must be an integer >= 0, got {self.n_classes!r}")

    @property
    def stop_token(self) -> int:
        return self.vocab_size - 1


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with three bias-free projections (query, key, value) and a
    biased output projection, as the official model (one GEMM: the three weights are stacked)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def qkv_weight(self) -> torch.Tensor:  # (3C, C): rows [q; k; v]
        return torch.cat([self.query.weight, self.key.weight, self.value.weight])

    def _heads(self, x):  # (B, T, 3C) -> 3 x (B, H, T, hd)
        B, T, C3 = x.shape
        return x.view(B, T, 3, self.n_head, C3 // (3 * self.n_head)).permute(2, 0, 3, 1, 4)

    def forward(self, x, key_mask=None):  # (B, T, C)
        """``key_mask`` (B, T) bool: real positions. Not needed for real positions (padding
        follows the stop token, so causality hides it); it only changes what padded queries see,
        which matters when the loss also runs over padding (the official procedure)."""
        B, T, C = x.shape
        q, k, v = self._heads(F.linear(x, self.qkv_weight()))
        drop = self.dropout if self.training else 0.0
        if key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            allowed = causal[None, None] & key_mask[:, None, None, :]  # (B, 1, T, T)
            allowed[..., 0] = True  # position 0 (start) is always real: no empty softmax rows
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def step(self, x, k_cache, v_cache, t: int, w_qkv=None):
        """One new token per row at position ``t``. x (n, C); caches (n, H, T_max, hd), filled
        up to ``t - 1``; this writes position ``t``. ``w_qkv``: :meth:`qkv_weight`, precomputed."""
        n, C = x.shape
        q, k, v = self._heads(F.linear(x, self.qkv_weight() if w_qkv is None else w_qkv)[:, None])  # (n, H, 1, hd)
        k_cache[:, :, t] = k[:, :, 0]
        v_cache[:, :, t] = v[:, :, 0]
        # attend over the cached prefix 0..t (all in the past: no mask needed)
        att = torch.matmul(q, k_cache[:, :, : t + 1].transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (n, H, 1, t+1)
        y = torch.matmul(att.softmax(-1), v_cache[:, :, : t + 1])  # (n, H, 1, hd)
        return self.proj(y.reshape(n, C))


class Block(nn.Module):
    """Post-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.ffn), nn.ReLU(), nn.Linear(cfg.ffn, cfg.n_embd))
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, key_mask=None):  # (B, T, C)
        x = self.ln1(x + self.drop(self.attn(x, key_mask)))
        return self.ln2(x + self.drop(self.mlp(x)))

    def step(self, x, k_cache, v_cache, t: int, w_qkv=None):  # x (n, C)
        x = self.ln1(x + self.attn.step(x, k_cache, v_cache, t, w_qkv))
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        self.config = cfg = config or GPTConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.class_embed = nn.Embedding(cfg.n_classes, cfg.n_embd) if cfg.n_classes else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)

    # ------------------------------------------------------------------ training / encoding
    def embed_tokens(self, seq):  # (B, T) ids -> (B, T, C); ids >= vocab_size are class tokens
        if self.class_embed is None:
            return self.embed(seq)
        V = self.config.vocab_size
        is_class = seq >= V
        x = self.embed(seq.masked_fill(is_class, START))
        if is_class.any():
            x = torch.where(is_class[..., None], self.class_embed((seq - V).clamp(min=0)), x)
        return x

    def backbone(self, seq, mask=None, zero_padding: bool = True):
        """Hidden states (B, T, n_embd) of token ids ``seq`` (B, T). ``mask`` (B, T) marks real
        tokens (a right-padded prefix); padded ids are replaced by the start id (the official
        padding value) so that any padding value is accepted, and padded outputs are zeroed.
        ``zero_padding=False`` keeps the padded outputs as the official model computes them
        (padded queries attend to the real tokens only)."""
        if mask is not None:
            seq = seq.masked_fill(~mask, START)
        key_mask = None if zero_padding else mask
        x = self.drop(self.embed_tokens(seq))  # (B, T, C)
        for block in self.blocks:
            x = block(x, key_mask)
        if mask is not None and zero_padding:
            x = x * mask[..., None]
        return x

    def forward(self, seq, mask=None):
        """Next-token logits at every position, (B, T, V). Training uses :meth:`loss`, which
        evaluates the head (V x n_embd, the dominant cost) only where targets are real."""
        return self.head(self.backbone(seq, mask))

    def loss(self, seq, mask, over_padding: bool = False):
        """Mean next-token cross-entropy over the real targets (tokens after start, up to and
        including stop; a class token is given, never a target); the head runs on those positions only, fused with the loss
        (:func:`head_cross_entropy`: the (M, V) logits never exist at once).

        ``over_padding=True`` is the official procedure: every position of ``seq`` counts, a
        padded position's target being the start id 0. As there, the inputs are the sequences
        without their stop token (padded with 0, masked as padding)."""
        inp, tgt = seq[:, :-1], seq[:, 1:]
        valid = target_mask(seq, mask, self.config.vocab_size)  # (B, T-1)
        if over_padding:
            h = self.backbone(inp, valid, zero_padding=False).flatten(0, 1)  # (B(T-1), C)
            tgt = tgt.masked_fill(~valid, START).flatten()
            return head_cross_entropy(h, self.head.weight, self.head.bias, tgt)
        h = self.backbone(inp, mask[:, :-1])[valid]  # (M, C)
        return head_cross_entropy(h, self.head.weight, self.head.bias, tgt[valid])

    # ------------------------------------------------------------------ sampling
    def _check_generate(self, n_jets, batch_size, temperature, max_constituents, top_k,
                        top_p) -> tuple[int, int | None, float | None]:
        """``(max_constituents, top_k, top_p)`` checked; top_k None when it keeps every drawable
        token, top_p None when it is 1."""
        if max_constituents is None:
            max_constituents = self.config.max_len - 2  # 128 for the paper's sequences
        n_drawable = self.config.vocab_size - 1  # the codes and stop; start is never drawn
        for name, value in (("n_jets", n_jets), ("batch_size", batch_size), ("max_constituents", max_constituents),
                            ("top_k", n_drawable if top_k is None else top_k)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise OmnijetError(f"generate: {name} must be an integer, got {value!r}")
        if n_jets < 0 or batch_size <= 0:
            raise OmnijetError(f"generate: n_jets must be >= 0 and batch_size > 0, got {n_jets}, {batch_size}")
        if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and temperature > 0):
            raise OmnijetError(f"generate: temperature must be a number > 0, got {temperature!r}")
        if not 1 <= max_constituents <= self.config.max_len - 2:
            raise OmnijetError(f"generate: max_constituents must be in 1..{self.config.max_len - 2}, "
                               f"got {max_constituents}")
        if top_k is not None and not 1 <= top_k <= n_drawable:
            raise OmnijetError(f"generate: top_k must be in 1..{n_drawable} (the codes and stop), got {top_k}")
        if top_p is not None and not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool)
                                      and 0 < top_p <= 1):
            raise OmnijetError(f"generate: top_p must be a number in (0, 1], got {top_p!r}")
        need, have = self._generate_bytes(n_jets, batch_size, max_constituents), _physical_memory()
        if have is not None and need > have:
            raise OmnijetError(f"generate: {n_jets:,} jets of up to {max_constituents} constituents (batch_size "
                               f"{batch_size}) need about {need / 2**30:,.1f} GiB, more than the {have / 2**30:.1f} "
                               "GiB of this machine; generate fewer jets per call (or use a smaller batch_size)")
        # keeping every token is no filter: the same draws as without top_k / top_p
        return max_constituents, (None if top_k == n_drawable else top_k), (None if top_p == 1 else top_p)

    def _class_tokens(self, labels, n_jets: int):
        """``labels`` of :meth:`generate` -> (n_jets,) int64 class token ids, or None."""
        if labels is None:
            return None
        n = self.config.n_classes
        if not n:
            raise OmnijetError("generate: labels given, but this GPT was trained without classes (n_classes 0)")
        lab = np.broadcast_to(np.asarray(labels), (n_jets,)) if np.ndim(labels) == 0 else np.asarray(labels)
        if lab.shape != (n_jets,) or not np.issubdtype(lab.dtype, np.integer):
            raise OmnijetError(f"generate: labels must be one class id or {n_jets} of them (integers), "
                               f"got {np.shape(labels)} of {lab.dtype}")
        if len(lab) and (lab.min() < 0 or lab.max() >= n):
            raise OmnijetError(f"generate: class ids must be in 0..{n - 1}, got {lab.min()}..{lab.max()}")
        return torch.from_numpy(lab.astype(np.int64) + self.config.vocab_size)

    def _generate_bytes(self, n_jets: int, batch_size: int, steps: int) -> int:
        """Memory a generation run needs at least: the tables of all jets (uniforms in float32;
        tokens, their cut copy in int64 and masks) and one batch's key/value caches and sampler buffers."""
        cfg, item = self.config, next(self.parameters()).element_size()
        batch = min(batch_size, n_jets) * (2 * cfg.n_layer * steps * cfg.n_embd + 2 * cfg.vocab_size) * item
        return n_jets * (4 * steps + 18 * (steps + 2)) + batch

    @torch.inference_mode()  # less per-op bookkeeping than no_grad: ~70 small ops per step
    def generate(self, n_jets: int, batch_size: int = 256, temperature: float = 1.0,
                 generator: torch.Generator | None = None, max_constituents: int | None = None,
                 top_k: int | None = None, top_p: float | None = None, labels=None):
        """Sample ``n_jets`` jets with a key/value cache.

        Returns numpy ``(seq, mask)``: seq (N, max_constituents + 2) int64 laid out like the
        training sequences (start 0, code+1 ..., stop), padded with 0 after stop; mask (N, ...)
        bool covering start..stop. Tokenizer codes are ``seq - 1`` where the mask is set,
        excluding positions 0 and the stop (see :func:`sequences_to_codes`). The start token is
        never drawn; a jet reaching ``max_constituents`` (default ``max_len - 2`` = 128) gets a
        forced stop; as in the original, stop may be drawn first (an empty jet), which a trained
        model makes rare. ``generator`` (CPU) draws all random numbers up front
        (:func:`draw_uniforms`, 512 bytes per jet). The sequences of all jets are kept in memory,
        so a count needing more memory than the machine has is refused (generate in parts).
        ``top_k``: draw from the k most probable next tokens only (stop among the candidates),
        renormalised; ``top_k=1`` is greedy decoding (the same jets whatever the generator).
        ``top_p`` in (0, 1]: draw from the smallest set of most probable next tokens whose
        probabilities (after temperature and top_k) sum to at least p, renormalised; 1 is no filter.
        ``labels`` (a model with ``n_classes``): the class of every jet, one id or (n_jets,) ids; the
        class token follows the start token, the returned sequences are the plain ones (without it).
        """
        max_constituents, top_k, top_p = self._check_generate(n_jets, batch_size, temperature, max_constituents,
                                                              top_k, top_p)
        cls = self._class_tokens(labels, n_jets)
        u = draw_uniforms(n_jets, max_constituents, generator)
        out = np.zeros((n_jets, max_constituents + 2), np.int64)
        was_training = self.training
        self.eval()
        try:
            for s in range(0, n_jets, batch_size):
                out[s:s + batch_size] = self._generate_batch(u[s:s + batch_size], temperature, top_k, top_p,
                                                             None if cls is None else cls[s:s + batch_size]
                                                             ).cpu().numpy()
        finally:
            self.train(was_training)
        return _finish(out, self.config.stop_token)

    def _generate_batch(self, u, temperature: float, top_k: int | None = None, top_p: float | None = None,
                        cls=None):
        """u (B, S) uniforms -> tokens (B, S + 2) with start at 0 and stop somewhere; ``cls`` (B,)
        class token ids fed after start (cache position 1) or None."""
        cfg, p = self.config, next(self.parameters())
        dev, dt = p.device, p.dtype
        B, S = u.shape
        u = u.to(dev, dt).t().contiguous()  # (S, B): the draws of step t are one row
        H, hd, V = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.vocab_size
        off = 0 if cls is None else 1  # cache positions before the first drawn token's input
        caches = [(torch.empty(B, H, S + off, hd, device=dev, dtype=dt),
                   torch.empty(B, H, S + off, hd, device=dev, dtype=dt))
                  for _ in self.blocks]  # per block: keys, values (B, H, S + off, hd)
        probs = torch.empty(B, V - 1, device=dev, dtype=dt)  # sampler buffers, reused every step
        cdf = torch.empty(B, V - 1, device=dev, dtype=dt)
        # the head without the start-token row, transposed once: (C, V-1) contiguous is up to 2x
        # faster than a transposed view for the small active batches of the tail
        w_t, b = self.head.weight[1:].t().contiguous(), self.head.bias[1:]
        w_qkv = [block.attn.qkv_weight() for block in self.blocks]  # stacked once, not per step
        tokens = torch.zeros(B, S + 2, dtype=torch.long, device=dev)  # output, start at 0
        rows = torch.arange(B, device=dev)  # active slot -> output row; slots 0..n-1 are active
        cur = torch.full((B,), START, dtype=torch.long, device=dev)  # last token of each active slot
        if cls is not None:  # the start token fills cache position 0; its successor is the class token
            x = self.embed(cur)
            for block, (kc, vc), w in zip(self.blocks, caches, w_qkv):
                x = block.step(x, kc, vc, 0, w)
            cur = cls.to(dev)
        n = B
        for t in range(S):
            x = self.embed_tokens(cur[:n])  # (n, C)
            for block, (kc, vc), w in zip(self.blocks, caches, w_qkv):
                x = block.step(x, kc[:n], vc[:n], t + off, w)
            logits = probs[:n]  # (n, V-1): ids 1..V-1
            # on CPUs the head GEMM is ~1.4x faster in column blocks whose output stays in cache
            step = HEAD_BLOCK if dev.type == "cpu" and n >= 64 else V - 1
            for c in range(0, V - 1, step):
                torch.addmm(b[c:c + step], x, w_t[:, c:c + step], out=logits[:, c:c + step])
            nxt = _inverse_cdf(logits, u[t, rows[:n]], temperature, cdf[:n], top_k, top_p) + 1  # (n,)
            tokens[rows[:n], t + 1] = nxt
            fin = nxt == cfg.stop_token
            n_fin = int(fin.sum())
            if n_fin == n:
                n = 0
                break
            if n_fin:
                # drop finished jets: the open ones among the last n_fin slots move into the
                # finished slots in front (moves n_fin rows of the cache, not all of them)
                m = n - n_fin
                holes = fin[:m].nonzero().squeeze(1)
                if len(holes):
                    src = (~fin[m:]).nonzero().squeeze(1) + m
                    for kc, vc in caches:
                        kc[holes, :, : t + off + 1] = kc[src, :, : t + off + 1]
                        vc[holes, :, : t + off + 1] = vc[src, :, : t + off + 1]
                    rows[holes], nxt[holes] = rows[src], nxt[src]
                n = m
            cur[:n] = nxt[:n]
        tokens[rows[:n], S + 1] = cfg.stop_token  # forced stop after S constituents
        return tokens

    @torch.inference_mode()
    def generate_reference(self, n_jets: int, batch_size: int = 256, temperature: float = 1.0,
                           generator: torch.Generator | None = None, max_constituents: int | None = None,
                           top_k: int | None = None, top_p: float | None = None, labels=None):
        """The original algorithm: every step re-runs the model (and the head on every position)
        on the whole prefix; always ``max_constituents`` steps, no cache, no early exit. Same
        random draws, ``top_k``, ``top_p``, ``labels`` and output format as :meth:`generate`."""
        max_constituents, top_k, top_p = self._check_generate(n_jets, batch_size, temperature, max_constituents,
                                                              top_k, top_p)
        cls = self._class_tokens(labels, n_jets)
        u = draw_uniforms(n_jets, max_constituents, generator)
        out = np.zeros((n_jets, max_constituents + 2), np.int64)
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            for s in range(0, n_jets, batch_size):
                ub = u[s:s + batch_size].to(dev)
                seq = torch.full((len(ub), 1), START, dtype=torch.long, device=dev)
                if cls is not None:
                    seq = torch.cat([seq, cls[s:s + batch_size, None].to(dev)], 1)
                for t in range(max_constituents):
                    logits = self.forward(seq)[:, -1, 1:]  # (B, V-1), start token excluded
                    nxt = _inverse_cdf(logits, ub[:, t].to(logits.dtype), temperature, top_k=top_k, top_p=top_p) + 1
                    seq = torch.cat([seq, nxt[:, None]], 1)
                stop = torch.full((len(ub), 1), self.config.stop_token, dtype=torch.long, device=dev)
                seq = seq if cls is None else torch.cat([seq[:, :1], seq[:, 2:]], 1)  # without the class token
                out[s:s + batch_size] = torch.cat([seq, stop], 1).cpu().numpy()
        finally:
            self.train(was_training)
        return _finish(out, self.config.stop_token)


# ---------------------------------------------------------------------- fused head + loss
class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits ``h @ W.T + b`` against ``target``, in row chunks.

    Forward forms, chunk by chunk, the logits, their softmax and at once the gradients
    ``(softmax - onehot) @ W`` and ``(softmax - onehot).T @ h``; backward only scales them.
    Same FLOPs as head + ``F.cross_entropy``, but no (M, V) logits, log-softmax and gradient
    tensors (~0.35 GB each for a batch of 256 jets and V = 8194) and ~3x fewer passes over them.
    Computed in float32 (autocast off) whatever the input precision; M > 0 (checked by the caller).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int):  # h (M, C), weight (V, C), target (M,)
        M = h.shape[0]
        grads = any(ctx.needs_input_grad[:3])
        with torch.autocast(h.device.type, enabled=False):
            h32, w32, b32 = h.float(), weight.float(), bias.float()
            total = torch.zeros((), dtype=torch.float64, device=h.device)
            gh = torch.empty_like(h32) if grads else None
            gw, gb = (torch.zeros_like(w32), torch.zeros_like(b32)) if grads else (None, None)
            for s in range(0, M, chunk):
                hs, ts = h32[s:s + chunk], target[s:s + chunk]
                z = torch.addmm(b32, hs, w32.t())  # (m, V) logits
                z_t = z.gather(1, ts[:, None])[:, 0]  # (m,) logit of the target
                zmax = z.amax(1, keepdim=True)
                p = z.sub_(zmax).exp_()  # unnormalised softmax, in place
                norm = p.sum(1, keepdim=True)  # (m, 1)
                total += (zmax[:, 0] + norm[:, 0].log() - z_t).sum(dtype=torch.float64)
                if grads:
                    p.div_(norm)  # softmax
                    p[torch.arange(len(ts), device=p.device), ts] -= 1.0  # d(sum of CE)/d logits
                    gh[s:s + chunk] = p @ w32
                    gw.addmm_(p.t(), hs)
                    gb += p.sum(0)
        if grads:
            ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes, ctx.n = (h.dtype, weight.dtype, bias.dtype), M
        return (total / M).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        gh, gw, gb = ctx.saved_tensors
        scale = grad.float() / ctx.n
        return ((gh * scale).to(ctx.dtypes[0]), (gw * scale).to(ctx.dtypes[1]), (gb * scale).to(ctx.dtypes[2]),
                None, None)


def head_cross_entropy(h, weight, bias, target, chunk: int | None = None):
    """``F.cross_entropy(h @ weight.T + bias, target)`` (mean) without materialising the logits:
    h (M, C), weight (V, C), bias (V,), target (M,) int. ``chunk`` rows at a time (default:
    ~4M logits, 16 MB, per chunk)."""
    if h.shape[0] == 0:
        raise OmnijetError("head_cross_entropy: no target positions (empty batch?)")
    chunk = chunk or max(64, 4_194_304 // weight.shape[0])
    return _HeadCrossEntropy.apply(h, weight, bias, target, chunk)


# ---------------------------------------------------------------------- sampling helpers
def _physical_memory() -> int | None:
    """Bytes of memory of this machine; None where the system does not tell (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def draw_uniforms(n_jets: int, steps: int, generator: torch.Generator | None = None):
    """The random numbers of a whole generation run: u[jet, step] ~ U[0, 1), (N, steps) float32."""
    return torch.rand(n_jets, steps, generator=generator)


def _inverse_cdf(logits, u, temperature: float, cdf=None, top_k: int | None = None, top_p: float | None = None):
    """Index drawn from softmax(logits / temperature) by inverse CDF: logits (n, V), u (n,).

    Exact up to float rounding; tokens whose probability underflows to 0 are never drawn.
    ``logits`` is overwritten when it is a buffer (it is used as scratch space). ``top_k``: the
    draw is among the k largest logits only (exactly k, ties broken by ``torch.topk``), in
    descending order, so k = 1 returns the argmax whatever ``u``. ``top_p`` (after top_k): among
    the fewest largest logits whose probabilities sum to at least p (at least one).
    """
    if top_k is not None or top_p is not None:
        # the candidates in descending order: the inverse CDF then walks the most probable first
        best, idx = logits.topk(top_k, dim=1) if top_k is not None else logits.sort(dim=1, descending=True)
        if top_p is None:
            return idx.gather(1, _inverse_cdf(best, u, temperature)[:, None]).squeeze(1)
        p = torch.softmax(best / temperature, 1)
        nucleus = (p.cumsum(1) - p) < top_p  # the probability before this token falls short of p
        pick = _inverse_cdf(best.masked_fill(~nucleus, -torch.inf), u, temperature)
        # u * total rounding up to the total would step past the nucleus
        pick = torch.minimum(pick, nucleus.sum(1) - 1)
        return idx.gather(1, pick[:, None]).squeeze(1)
    p = logits if cdf is not None else logits.clone()
    p.sub_(p.amax(1, keepdim=True))
    if temperature != 1.0:
        p.mul_(1.0 / temperature)
    p.exp_()
    cdf = torch.cumsum(p, 1, out=cdf) if cdf is not None else torch.cumsum(p, 1)
    x = u[:, None] * cdf[:, -1:]  # (n, 1) in [0, total)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(1)  # first index with cdf > x
    return idx.clamp_(max=logits.shape[1] - 1)


def sample_tokens(logits, u, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Public form of the sampler: one index per row of ``logits`` (n, V) from uniforms u (n,)."""
    return _inverse_cdf(logits.clone(), u.to(logits.dtype), temperature, top_k=top_k, top_p=top_p)


def _finish(tokens: np.ndarray, stop: int):
    """Cut each row after its first stop token: returns (seq padded with 0, mask)."""
    is_stop = tokens == stop
    is_stop[:, 0] = False
    first = is_stop.argmax(1)  # every row has a stop (forced at the end)
    mask = np.arange(tokens.shape[1])[None, :] <= first[:, None]
    return np.where(mask, tokens, 0), mask


def sequences_to_codes(seq, mask, vocab_size: int):
    """Tokenizer codes of sequences: (codes (N, L-2) int64 = id - 1, padded with -1; code mask)."""
    seq, mask = np.asarray(seq), np.asarray(mask, bool)
    body, m = seq[:, 1:-1], mask[:, 1:-1] & (seq[:, 1:-1] != vocab_size - 1)
    return np.where(m, body - 1, -1), m


def check_sequences(seq, mask, vocab_size: int, max_len: int, name: str = "seq"):
    """Validate tokenizer sequences; returns (seq int64, mask bool) numpy arrays or raises
    :class:`OmnijetError` naming the problem."""
    seq, mask = np.asarray(seq), np.asarray(mask)
    if seq.ndim != 2 or seq.shape != mask.shape:
        raise OmnijetError(f"{name}: expected (N, L) token ids and a mask of the same shape, "
                           f"got {seq.shape} and {mask.shape}")
    if not np.issubdtype(seq.dtype, np.integer):
        raise OmnijetError(f"{name}: token ids must be integers, got {seq.dtype}")
    if seq.shape[1] > max_len:
        raise OmnijetError(f"{name}: sequences have {seq.shape[1]} positions, the model allows {max_len}")
    seq, mask = seq.astype(np.int64), mask.astype(bool)
    n = mask.sum(1)
    if len(seq) and n.min() < 2:
        raise OmnijetError(f"{name}: jet {int(np.argmin(n))} has fewer than 2 tokens (start and stop)")
    if np.any(mask[:, 1:] & ~mask[:, :-1]):
        raise OmnijetError(f"{name}: mask must be a prefix (real tokens first, padding after stop)")
    real = seq[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise OmnijetError(f"{name}: token ids span {real.min()}..{real.max()}, outside the vocabulary "
                           f"0..{vocab_size - 1} (vocab_size {vocab_size})")
    if len(seq) and np.any(seq[:, 0] != 0):
        raise OmnijetError(f"{name}: every sequence must begin with the start token 0")
    if len(seq) and np.any(seq[np.arange(len(seq)), n - 1] != vocab_size - 1):
        raise OmnijetError(f"{name}: every sequence must end with the stop token {vocab_size - 1} "
                           f"(is the vocabulary K + 2 of the tokenizer's codebook?)")
    return seq, mask


def target_mask(seq, mask, vocab_size: int):
    """(B, T-1) bool: the positions whose next token ``seq[:, 1:]`` the model predicts, the real
    tokens after start (codes and stop); a class token (id >= ``vocab_size``) is given, never a target."""
    return mask[:, 1:] & (seq[:, 1:] < vocab_size)


def insert_class_token(seq, mask, labels, vocab_size: int):
    """Sequences with the class token ``vocab_size + label`` right after start: seq, mask (B, T)
    tensors, labels (B,) class ids -> (B, T + 1). A row whose label is < 0 stays as it is (one
    more padding position): no class, the plain sequence."""
    has = (labels >= 0)[:, None]  # (B, 1)
    token = (labels.clamp(min=0) + vocab_size).to(seq.dtype)[:, None]
    pad, no = seq.new_zeros(len(seq), 1), mask.new_zeros(len(mask), 1)
    return (torch.where(has, torch.cat([seq[:, :1], token, seq[:, 1:]], 1), torch.cat([seq, pad], 1)),
            torch.where(has, torch.cat([mask[:, :1], ~no, mask[:, 1:]], 1), torch.cat([mask, no], 1)))


# ---------------------------------------------------------------------- likelihood
@torch.inference_mode()
def log_likelihood(model: GPT, seq, mask, batch_size: int = 1024, labels=None) -> dict:
    """The log-probability ``model`` gives each jet: ``{"total", "n_tokens", "per_token"}``, numpy (N,).

    ``seq``, ``mask`` (N, L), numpy or torch: sequences as the GPT is trained on them (start 0,
    code+1, stop K+1; the mask covers start..stop). ``total`` (float64) is the sum over every
    predicted token (each code and the stop; the start is given) of ``log p(token | tokens
    before)``, natural log; ``n_tokens`` (int64) their number, the constituents + 1; ``per_token``
    = total / n_tokens. The distribution is the sampler's at temperature 1 (softmax over the codes
    and stop, the start token is never drawn), so on jets of :meth:`GPT.generate` the total is the
    sum of the logs of the probabilities each token was drawn with. One exception: a jet that
    reached ``max_constituents`` got a forced stop, which the sampler did not draw; here it counts
    like any stop, log p(stop | its constituents): the likelihood of exactly these constituents
    and no more, lower than the probability of drawing them.

    Jets go in batches of ``batch_size`` sorted by length, each trimmed to its longest jet, one
    forward pass per batch (eval mode) on the model's device; the result does not depend on the
    batching (up to float rounding) and is in input order. ``labels`` (N,) (a model with
    ``n_classes``): the likelihood given each jet's class, ``log p(jet | class)``; -1: without one."""
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise OmnijetError(f"log_likelihood: batch_size must be an integer >= 1, got {batch_size!r}")
    seq, mask = (a.detach().cpu().numpy() if torch.is_tensor(a) else a for a in (seq, mask))
    cfg, dev = model.config, next(model.parameters()).device
    seq, mask = check_sequences(seq, mask, cfg.vocab_size, cfg.max_len, name="log_likelihood")
    if labels is not None:
        labels = np.asarray(labels)
        if not cfg.n_classes:
            raise OmnijetError("log_likelihood: labels given, but the GPT was trained without classes (n_classes 0)")
        if labels.shape != (len(seq),) or not np.issubdtype(labels.dtype, np.integer) or (
                len(labels) and labels.max() >= cfg.n_classes):
            raise OmnijetError(f"log_likelihood: labels must be {len(seq)} class ids < {cfg.n_classes} (-1: none), "
                               f"got {labels.shape} of {labels.dtype}")
        labels = torch.from_numpy(labels.astype(np.int64))
    n_tokens = mask.sum(1) - 1
    total = np.zeros(len(seq))
    order = np.argsort(n_tokens, kind="stable")
    weight, bias = model.head.weight[1:], model.head.bias[1:]  # the drawable ids 1..V-1, as the sampler
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(seq), batch_size):
            rows = order[s:s + batch_size]
            width = int(n_tokens[rows].max()) + 1  # start and the predicted tokens
            x = torch.from_numpy(seq[rows, :width]).to(dev)
            m = torch.from_numpy(mask[rows, :width]).to(dev)
            if labels is not None:
                x, m = insert_class_token(x, m, labels[rows].to(dev), cfg.vocab_size)
            predicted = target_mask(x, m, cfg.vocab_size)  # (B, width-1)
            h = model.backbone(x[:, :-1], m[:, :-1])[predicted]  # (M, C)
            per_token = torch.zeros(predicted.shape, dtype=torch.float64, device=dev)  # (B, width-1)
            per_token[predicted] = _token_log_probs(h, weight, bias, x[:, 1:][predicted] - 1)
            total[rows] = per_token.sum(1).cpu().numpy()
    finally:
        model.train(was_training)
    return {"total": total, "n_tokens": n_tokens, "per_token": total / n_tokens}


def _token_log_probs(h, weight, bias, target):
    """``log_softmax(h @ weight.T + bias)[target]`` per row, float64: h (M, C), target (M,), in
    row chunks of ~4M logits (the (M, V) logits of a batch of long jets would not fit)."""
    out = torch.empty(len(h), dtype=torch.float64, device=h.device)
    chunk = max(64, 4_194_304 // weight.shape[0])
    for s in range(0, len(h), chunk):
        z = torch.addmm(bias, h[s:s + chunk], weight.t()).double()  # the sampler's logits, in float64
        out[s:s + chunk] = z.gather(1, target[s:s + chunk, None])[:, 0] - z.logsumexp(1)
    return out

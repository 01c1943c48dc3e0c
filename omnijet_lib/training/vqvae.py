"""Training of the VQ-VAE tokenizers with Lightning.

loss = MSE(reconstruction, real entries only) + 10 × quantizer loss; AdamW (lr 1e-3, weight
decay 1e-2) with a one-cycle learning-rate schedule over the trainer's estimated steps.
Batches come from :func:`make_loader` (length-bucketed, trimmed to the longest jet), so
attention, quantizer and loss never touch padding beyond that. The official procedure
(``TrainConfig.from_params({"procedure": "official"})``) instead takes random batches padded
to 128, averages both losses over every slot (padding included, its latents quantized too),
clips gradients at 5 and follows the official per-epoch OneCycleCooldown schedule. The codebook is k-means
initialised from the first training batch (inside the quantizer). Resumable through
:func:`fit` (``out_dir/last.ckpt``); the result is saved as ``out_dir/tokenizer.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from ..io import OmnijetError, changed_settings, default_device, write_json
from ..tokenizers.base import TOKENIZER_KINDS, save_tokenizer
from ..tokenizers.binned import BinnedConfig, BinnedTokenizer
from ..tokenizers.vqvae import VQVAE, VQVAEConfig
from .batching import PaddedDataset, make_loader
from .fit import TrainConfig, fit, lr_scheduler, one_cycle

log = logging.getLogger(__name__)

__all__ = ["VQVAEModule", "codebook_stats", "one_cycle_cooldown", "train_tokenizer", "make_tokenizer", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.safetensors"  # the weights in a run folder


def codebook_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, perplexity exp(H)) from per-code counts (K,)."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()


def one_cycle_cooldown(warmup: int = 4, cooldown: int = 20, cooldown_final: int = 50, initial_lr: float = 5e-4,
                       max_lr: float = 1e-3, final_lr: float = 3e-4):
    """The official VQ-VAE schedule, per epoch: lr rises linearly from ``initial_lr`` to
    ``max_lr`` over ``warmup`` epochs, falls back to ``initial_lr`` over ``cooldown``, then to
    ``final_lr`` over ``cooldown_final`` and stays there. Returns lr(epoch) / ``max_lr``."""
    def factor(epoch: int) -> float:
        e = epoch
        if e <= warmup:
            lr = initial_lr + (max_lr - initial_lr) * e / warmup
        elif e <= warmup + cooldown:
            lr = max_lr - (max_lr - initial_lr) * (e - warmup) / cooldown
        elif e <= warmup + cooldown + cooldown_final:
            lr = initial_lr - (initial_lr - final_lr) * (e - warmup - cooldown) / cooldown_final
        else:
            lr = final_lr
        return lr / max_lr

    return factor


class VQVAEModule(pl.LightningModule):
    """Lightning wrapper: the loss, the optimiser and codebook usage / perplexity logging."""

    def __init__(self, model: VQVAE, lr: float = 1e-3, weight_decay: float = 1e-2, vq_weight: float = 10.0,
                 loss_over_padding: bool = False, schedule: str = "one_cycle"):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.vq_weight = lr, weight_decay, vq_weight
        self.loss_over_padding, self.schedule = loss_over_padding, schedule
        self.history: list[dict] = []
        self._val_counts = None

    def losses(self, batch: dict):
        """(total, mse, quantizer output) for a batch {"x": (B, L, 3), "mask": (B, L)}."""
        x, mask = batch["x"], batch["mask"]
        x_rec, q = self.model(x, mask)                   # (B, L, 3)
        m = mask[..., None].to(x.dtype)
        if self.loss_over_padding:  # official: every slot, the target at padding being 0
            mse = ((x_rec - x * m) ** 2).mean()
        else:
            mse = ((x_rec - x) ** 2 * m).sum() / (m.sum() * x.shape[-1]).clamp_min(1)
        return mse + self.vq_weight * q.loss, mse, q

    def _counts(self, q, mask) -> torch.Tensor:
        return torch.bincount(q.indices[mask], minlength=self.model.num_codes)

    def training_step(self, batch, batch_idx):
        loss, mse, q = self.losses(batch)
        usage, ppl = codebook_stats(self._counts(q, batch["mask"]))
        self.log("train_loss", loss, batch_size=len(batch["x"]), prog_bar=True)
        self.log_dict({"train_mse": mse, "train_vq_loss": q.loss, "train_usage": usage,
                       "train_perplexity": ppl}, batch_size=len(batch["x"]))
        return loss

    def on_validation_epoch_start(self):
        self._val_counts = torch.zeros(self.model.num_codes, dtype=torch.long, device=self.device)

    def validation_step(self, batch, batch_idx):
        loss, mse, q = self.losses(batch)
        self._val_counts += self._counts(q, batch["mask"])
        self.log_dict({"val_loss": loss, "val_mse": mse, "val_vq_loss": q.loss},
                      batch_size=len(batch["x"]), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self):
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        usage, ppl = codebook_stats(counts)
        self.log_dict({"val_usage": usage, "val_perplexity": ppl}, prog_bar=True)
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        self.history.append({"epoch": int(self.current_epoch), "step": int(self.global_step), **metrics,
                             "val_usage": float(usage), "val_perplexity": float(ppl)})

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "official":
            return lr_scheduler(opt, one_cycle_cooldown(max_lr=self.lr, initial_lr=self.lr / 2,
                                                              final_lr=0.3 * self.lr))
        return lr_scheduler(opt, one_cycle(self.trainer.estimated_stepping_batches), "step")


# --------------------------------------------------------------------------- entry point
def tokenizer_config(kind: str, num_codes: int | None = None, **model_kw):
    """The config of an untrained tokenizer of ``kind`` (:func:`make_tokenizer`), without building it."""
    if kind not in TOKENIZER_KINDS:
        raise OmnijetError(f"tokenizer kind {kind!r} is unknown, expected one of {TOKENIZER_KINDS}")
    if kind == "binned":
        bins = model_kw.pop("bins", None)
        if bins is None:
            if num_codes is None:
                raise OmnijetError("binned tokenizer: give bins or num_codes")
            bins = round(num_codes ** (1 / 3))
        if num_codes is not None and bins ** 3 != num_codes:
            raise OmnijetError(f"binned tokenizer: num_codes {num_codes} is not bins³ (bins={bins})")
        return BinnedConfig(bins=int(bins), **model_kw)
    if num_codes is None or num_codes < 1:
        raise OmnijetError(f"num_codes must be a positive integer, got {num_codes}")
    try:
        return VQVAEConfig(conditional=kind == "conditional", num_codes=int(num_codes), **model_kw)
    except TypeError as err:
        raise OmnijetError(f"tokenizer parameters: {err}") from None


def make_tokenizer(kind: str, num_codes: int | None = None, **model_kw):
    """An untrained tokenizer of ``kind`` ("conditional", "unconditional", "binned").

    For "binned", ``bins`` (per feature) may be given; otherwise ``num_codes`` must be a cube."""
    config = tokenizer_config(kind, num_codes, **model_kw)
    return BinnedTokenizer(config) if kind == "binned" else VQVAE(config)


def train_tokenizer(kind: str, x, mask, num_codes: int | None, epochs: int, batch_size: int = 512,
                    out_dir: str | os.PathLike | None = None, train_config: TrainConfig | None = None,
                    seed: int = 0, val_fraction: float = 0.1, **model_kw):
    """Train (or, for "binned", fit the ranges of) a tokenizer on padded features.

    ``x`` (N, L, 3) float, ``mask`` (N, L) bool; a ``val_fraction`` of the jets (seeded) is
    held out for ``val_loss`` and the best epoch is kept. Saves ``out_dir/tokenizer.safetensors``
    and ``history.json`` (per-epoch validation loss, codebook usage, perplexity; also as
    ``tokenizer.train_history``). A rerun with the same ``out_dir`` resumes from
    ``out_dir/last.ckpt`` (or returns at once when it had finished); a rerun with other settings
    in the same ``out_dir`` is refused. ``seed`` drives the split, the initialisation and
    Lightning's seed; ``epochs`` overrides ``train_config.max_epochs``. ``model_kw`` go to
    :class:`VQVAEConfig` (or ``bins`` for binned). Returns the tokenizer in eval mode on the
    default device.
    """
    x = np.asarray(x, np.float32)
    mask = np.asarray(mask, bool)
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise OmnijetError(f"train_tokenizer: x {x.shape} and mask {mask.shape} must be (N, L, 3) and (N, L)")
    if not np.isfinite(x[mask]).all():
        raise OmnijetError("train_tokenizer: x contains NaN/inf in real entries")
    if epochs < 0 or batch_size < 1 or not 0 <= val_fraction < 1:
        raise OmnijetError(f"train_tokenizer: need epochs >= 0, batch_size >= 1, 0 <= val_fraction < 1 "
                           f"(got {epochs}, {batch_size}, {val_fraction})")
    out_dir = Path(out_dir) if out_dir is not None else None
    cfg = dataclasses.replace(train_config or TrainConfig(), max_epochs=epochs, seed=seed)
    torch.manual_seed(seed)
    if kind != "binned":
        model_kw.setdefault("quantize_padding", cfg.quantize_padding)
    tok = make_tokenizer(kind, num_codes, **model_kw)
    if kind == "binned":
        tok.fit(x, mask)
        if out_dir is not None:
            save_tokenizer(out_dir / TOKENIZER_FILE, tok)
        return tok.to(default_device()).eval()

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_val = int(round(val_fraction * len(x)))
    if len(x) - n_val < 1:
        raise OmnijetError(f"train_tokenizer: {len(x)} jets leave no training set")
    tr, va = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    bucket = cfg.batching == "bucketed"
    train_loader = make_loader(PaddedDataset(x[tr], mask[tr]), batch_size, shuffle=True, seed=seed, bucket=bucket)
    val_loader = make_loader(PaddedDataset(x[va], mask[va]), batch_size, shuffle=False, bucket=bucket) if n_val else None
    if out_dir is not None:
        _check_same_run(out_dir, {"kind": kind, **dataclasses.asdict(tok.config), "seed": seed,
                                  "jets": len(x), "val_fraction": val_fraction, "batch_size": batch_size,
                                  **cfg.procedure})
    module = VQVAEModule(tok, loss_over_padding=cfg.loss_over_padding, schedule=cfg.schedule)
    history = []
    if out_dir is not None and (out_dir / "last.ckpt").is_file() and (out_dir / "history.json").is_file():
        history = json.loads((out_dir / "history.json").read_text())  # epochs before the resume
    fit(module, train_loader, val_loader, out_dir, cfg)
    tok = module.model
    new_epochs = {h["epoch"] for h in module.history}
    tok.train_history = [h for h in history if h["epoch"] not in new_epochs] + module.history
    if out_dir is not None:
        save_tokenizer(out_dir / TOKENIZER_FILE, tok)
        write_json(out_dir / "history.json", tok.train_history)
    return tok.to(default_device()).eval()


def _check_same_run(out_dir: Path, settings: dict) -> None:
    """Record the run's settings in ``out_dir/run.json``; refuse to resume a different run."""
    path = out_dir / "run.json"
    if path.is_file() and (out_dir / "last.ckpt").is_file():
        diff = changed_settings(path, settings)
        if diff:
            raise OmnijetError(f"{out_dir}: holds a tokenizer run with other settings ({', '.join(diff)} differ); "
                               f"use another out_dir or delete it")
    write_json(path, settings)

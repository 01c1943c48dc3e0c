"""Classification training shared by every classifier (DeepSets, NormFormer, GPT head).

The wrapped model maps ``(x, mask) -> logits (B, C)``; batches carry ``label``. Validation logs
``val_loss`` and ``val_acc`` (early stopping and best-checkpoint selection use ``val_loss``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
import lightning.pytorch as pl

from .batching import PaddedDataset, make_loader
from .fit import TrainConfig, first_epoch_factor, fit, lr_scheduler

__all__ = ["ClassifierModule", "train_classifier", "predict_proba", "split_indices"]


class ClassifierModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 1e-2,
                 params=None, first_epoch_lr_factor: float = 1.0):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.first_epoch_lr_factor = first_epoch_lr_factor
        self._params = params  # optional subset (e.g. head only when the backbone is frozen)

    def forward(self, x, mask):
        return self.model(x, mask)

    def _step(self, batch, stage):
        logits = self(batch["x"], batch["mask"])
        loss = F.cross_entropy(logits, batch["label"].long())
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=len(logits))
        self.log(f"{stage}_acc", acc, prog_bar=stage == "val", batch_size=len(logits))
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def configure_optimizers(self):
        params = self._params if self._params is not None else [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return lr_scheduler(opt, first_epoch_factor(self.first_epoch_lr_factor))


def split_indices(n: int, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> list[np.ndarray]:
    """Random disjoint index sets with the given fractions (e.g. train/val/test 60/20/20)."""
    perm = np.random.default_rng(seed).permutation(n)
    edges = np.round(np.cumsum(fractions) / np.sum(fractions) * n).astype(int)
    return np.split(perm, edges[:-1])


def train_classifier(model, x, mask, labels, val=None, out_dir=None, epochs: int | None = 10,
                     batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-2,
                     train_config: TrainConfig | None = None, seed: int = 0, params=None):
    """Train ``model`` on padded inputs; ``val = (x, mask, labels)`` enables best-weights restore."""
    cfg = dataclasses.replace(train_config or TrainConfig(), seed=seed)
    bucket = cfg.batching == "bucketed"
    train_loader = make_loader(PaddedDataset(x, mask, label=labels), batch_size, shuffle=True, seed=seed, bucket=bucket)
    val_loader = None
    if val is not None:
        val_loader = make_loader(PaddedDataset(val[0], val[1], label=val[2]), batch_size, shuffle=False, bucket=bucket)
    if epochs is not None:  # an explicit epochs wins over train_config.max_epochs
        cfg = dataclasses.replace(cfg, max_epochs=epochs)
    module = ClassifierModule(model, lr=lr, weight_decay=weight_decay, params=params,
                              first_epoch_lr_factor=cfg.first_epoch_lr_factor)
    fit(module, train_loader, val_loader, out_dir=out_dir, config=cfg)
    return module.model


@torch.no_grad()
def predict_proba(model, x, mask, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities ``(N, C)`` in the input order (bucketed batches, trimmed)."""
    model.eval()
    device = next(model.parameters()).device
    ds = PaddedDataset(x, mask, index=np.arange(len(x)))
    out = None
    for batch in make_loader(ds, batch_size, shuffle=False):
        p = torch.softmax(model(batch["x"].to(device), batch["mask"].to(device)), -1).cpu().numpy()
        if out is None:
            out = np.zeros((len(x), p.shape[1]), np.float32)
        out[batch["index"].numpy()] = p
    return out

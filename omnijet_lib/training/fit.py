"""One small ``fit()`` shared by every model: Lightning Trainer, resumable, device-agnostic.

* Resume state (weights, optimiser, schedule, step) lives in ``<out_dir>/last.ckpt`` and is
  reloaded with ``torch.load(weights_only=True)``; a rerun of the same call continues from it.
* The trained model is exported as ``<out_dir>/model.safetensors`` with its dataclass config,
  loadable with :func:`omnijet_lib.io.load_model` without unpickling anything.
* ``devices``/``num_nodes``/``strategy``/``precision`` go straight to Lightning, so the same
  call runs on a laptop CPU, a GPU or a DDP cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import OmnijetError, atomic_path, exclusive_lock, first_process, safe_torch_load

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "OFFICIAL_PROCEDURE", "fit", "lr_scheduler", "first_epoch_factor",
           "one_cycle"]


#: Lightning's precision settings
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64",
              "transformer-engine", "transformer-engine-float16")


@dataclass
class TrainConfig:
    max_epochs: int = 10
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Any = "32-true"
    seed: int = 0
    progress_bar: bool = True
    log_every_n_steps: int = 10
    patience: int | None = None          # early stopping on val_loss when set
    limit_train_batches: int | float = 1.0  # optimiser steps per epoch (int) or fraction of the batches
    # --- the training procedure; OFFICIAL_PROCEDURE holds the official OmniJet-α choices
    gradient_clip_val: float | None = 5.0  # the official value; None: no clipping (README, differences)
    schedule: str = "one_cycle"          # VQ-VAE and GPT lr: "one_cycle" per step, or "official" (VQ-VAE:
                                         # OneCycleCooldown per epoch; GPT: constant after the first epoch)
    first_epoch_lr_factor: float = 1.0   # classifiers, and the GPT with schedule "official": lr × this in epoch 0
    loss_over_padding: bool = False      # losses averaged over every padded slot, not only real entries
    quantize_padding: bool = False       # VQ-VAE: padding latents in the quantizer's loss, k-means, replacement
    batching: str = "bucketed"           # "bucketed" (by length, trimmed) or "random" (padded to full length)
    head_init: str = "zero"              # GPT classifier output layer: "zero" or "default" (PyTorch's)

    def __post_init__(self):
        if self.schedule not in ("one_cycle", "official"):
            raise OmnijetError(f"trainer.schedule must be 'one_cycle' or 'official', got {self.schedule!r}")
        if self.batching not in ("bucketed", "random"):
            raise OmnijetError(f"trainer.batching must be 'bucketed' or 'random', got {self.batching!r}")
        if self.head_init not in ("zero", "default"):
            raise OmnijetError(f"trainer.head_init must be 'zero' or 'default', got {self.head_init!r}")
        if not 0 < self.first_epoch_lr_factor <= 1:
            raise OmnijetError(f"trainer.first_epoch_lr_factor must be in (0, 1], got {self.first_epoch_lr_factor}")
        if str(self.precision) not in PRECISIONS:
            raise OmnijetError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (self.devices == "auto" or (isinstance(self.devices, int) and not isinstance(self.devices, bool)
                                           and (self.devices > 0 or self.devices == -1))
                or isinstance(self.devices, list)):
            raise OmnijetError(f"trainer.devices must be auto, a positive count, -1 (all) or a list of device "
                               f"indices, got {self.devices!r}")
        if not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise OmnijetError(f"trainer.num_nodes must be a positive integer, got {self.num_nodes!r}")

    @classmethod
    def from_params(cls, params: dict | None = None, **overrides) -> "TrainConfig":
        """Build from a params-profile dict, ignoring keys that are not training settings.
        ``procedure: official`` starts from :data:`OFFICIAL_PROCEDURE` (explicit keys still win)."""
        params = dict(params or {})
        procedure = params.pop("procedure", "default")
        if procedure not in ("default", "official"):
            raise OmnijetError(f"trainer.procedure must be 'default' or 'official', got {procedure!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = dict(OFFICIAL_PROCEDURE) if procedure == "official" else {}
        kw.update({k: v for k, v in params.items() if k in names})
        kw.update(overrides)
        return cls(**kw)

    @property
    def settings(self) -> dict:
        """Every setting that can change what a training gives (all but how it reports)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress_bar", "log_every_n_steps")}

    @property
    def procedure(self) -> dict:
        """The procedure settings (recorded with each run, so a resume cannot mix procedures)."""
        return {k: getattr(self, k) for k in OFFICIAL_PROCEDURE}


# The official OmniJet-α training procedure (gabbro's configs and Lightning modules); our
# defaults differ where README "Differences from the official implementation" says why.
OFFICIAL_PROCEDURE = {
    "gradient_clip_val": 5.0,
    "schedule": "official",
    "first_epoch_lr_factor": 1 / 3,   # torch's ConstantLR(total_iters=1), stepped per epoch
    "loss_over_padding": True,
    "quantize_padding": True,
    "batching": "random",
    "head_init": "default",
}


def lr_scheduler(optimizer, factor, interval: str = "epoch"):
    """A Lightning scheduler entry: lr × ``factor(i)``, ``i`` counting epochs (``interval``
    "epoch") or optimiser steps ("step")."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": interval}}


def one_cycle(total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4):
    """LR multiplier of the one-cycle policy (cosine warm-up from max/25 to max over 30% of the
    steps, cosine decay to max/25/1e4), constant after ``total_steps``.

    A plain function for ``LambdaLR`` rather than ``OneCycleLR``: its state holds no
    ``total_steps``, so a resumed run with a different length continues instead of failing."""
    total = max(int(total_steps), 1)
    up = max(int(pct_start * total), 1)
    lo, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

    def cos(a, b, frac):
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))

    def factor(step: int) -> float:
        if step < up:
            return cos(lo, 1.0, step / up)
        return cos(1.0, end, (step - up) / max(total - 1 - up, 1))

    return factor


def first_epoch_factor(factor: float):
    """lr × ``factor`` in epoch 0, then × 1: the official ConstantLR(total_iters=1)."""
    return lambda epoch: factor if epoch < 1 else 1.0


def fit(module, train_loader, val_loader=None, out_dir: str | os.PathLike | None = None,
        config: TrainConfig | None = None, resume: bool = True, callbacks=()):
    """Train a LightningModule; resumable from ``out_dir/last.ckpt``. Returns the module with the
    best (lowest ``val_loss``) weights restored when a validation set is given.

    ``out_dir`` is locked for the training: a second process training into it waits, naming the
    first, and then resumes from where it ended. Only the first process of a multi-process
    (DDP) run takes the lock; its other ranks write nothing there."""
    if out_dir is None or not first_process():
        return _fit(module, train_loader, val_loader, out_dir, config, resume, callbacks)
    with exclusive_lock(out_dir, wait=True):
        return _fit(module, train_loader, val_loader, out_dir, config, resume, callbacks)


def _fit(module, train_loader, val_loader, out_dir, config: TrainConfig | None, resume: bool, extra=()):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    cfg = config or TrainConfig()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = list(extra)
    ckpt_path = None
    best_cb = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        monitor = "val_loss" if val_loader is not None else None
        best_cb = ModelCheckpoint(dirpath=out_dir, filename="best", monitor=monitor, mode="min",
                                  save_last=monitor is None, save_top_k=1, enable_version_counter=False)
        callbacks.append(best_cb)
        if monitor is not None:
            # Lightning (>= 2.4) writes save_last copies only when a top-k checkpoint is written, so
            # last.ckpt would go stale once val_loss stops improving; keep it current separately
            callbacks.append(ModelCheckpoint(dirpath=out_dir, filename="last", save_top_k=1,
                                             enable_version_counter=False))
        if resume and (out_dir / "last.ckpt").is_file():
            ckpt_path = out_dir / "last.ckpt"
            _check_resume(ckpt_path)
            log.info("resuming from %s", ckpt_path)
    if cfg.patience is not None and val_loader is not None:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min"))
    callbacks.append(rank_aware_loaders(train_loader, val_loader))
    # without a progress bar (notebooks, batch jobs) Lightning's start-up chatter (devices, tips)
    # is silenced as well; warnings, errors and its messages during fit ("Restoring states") show
    pl_log = logging.getLogger("lightning.pytorch")
    level = pl_log.level
    if not cfg.progress_bar:
        pl_log.setLevel(max(level, logging.WARNING))
    try:
        trainer = pl.Trainer(
            max_epochs=cfg.max_epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator,
            devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy, precision=cfg.precision,
            callbacks=callbacks, enable_progress_bar=cfg.progress_bar, logger=False,
            enable_checkpointing=out_dir is not None, default_root_dir=out_dir,
            log_every_n_steps=cfg.log_every_n_steps, enable_model_summary=False,
            limit_train_batches=cfg.limit_train_batches,
            gradient_clip_val=cfg.gradient_clip_val, num_sanity_val_steps=0,
            use_distributed_sampler=False, plugins=[_atomic_checkpoint_io()],
        )
    finally:
        pl_log.setLevel(level)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        warnings.filterwarnings("ignore", ".*IterableDataset. has .__len__. defined.*")  # ours splits by worker
        warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")  # we resume there
        warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")  # Lightning vs torch 2.13
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)
    if best_cb is not None and val_loader is not None and best_cb.best_model_path:
        state = torch.load(best_cb.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
    module.trainer_ = trainer
    return module


def _check_resume(path: Path) -> None:
    """Refuse a ``last.ckpt`` that is unreadable or carries code before Lightning touches it."""
    try:
        state = safe_torch_load(path)
    except OmnijetError as err:
        raise OmnijetError(f"{err}; cannot resume from it (delete it to start afresh)") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise OmnijetError(f"{path}: not a Lightning checkpoint (no state_dict); cannot resume from it")


def _atomic_checkpoint_io():
    """Lightning's default writes checkpoints through a temp file in the system temp folder and
    moves it, which is a non-atomic copy when ``out_dir`` is on another filesystem (typical on
    clusters). Write to a temp name next to the target and rename instead."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)

    return AtomicCheckpointIO()


def rank_aware_loaders(*loaders):
    """A callback that splits our loaders across DDP ranks once the ranks are known.

    ``use_distributed_sampler=False`` keeps Lightning from replacing the length-bucketed batch
    sampler, so the split is ours: anything on a loader (``sampler``, ``batch_sampler``,
    ``dataset``) with ``num_replicas`` and ``rank`` attributes (:class:`BucketBatchSampler`,
    :class:`~omnijet_lib.data.shards.TokenShardDataset`, torch's ``DistributedSampler``) gets the
    trainer's world size and global rank. Done in ``setup``, i.e. inside each rank's process
    and before Lightning counts the batches. (Like :func:`_atomic_checkpoint_io` a local class,
    so importing this module does not import Lightning; hence no ``ddp_spawn``, which pickles
    the trainer: use ``ddp``, or ``ddp_notebook`` inside Jupyter.)"""
    from lightning.pytorch.callbacks import Callback

    class RankAwareLoaders(Callback):
        def setup(self, trainer, pl_module, stage):
            if trainer.world_size <= 1:
                return
            for loader in loaders:
                parts = (getattr(loader, a, None) for a in ("sampler", "batch_sampler", "dataset"))
                for obj in {id(o): o for o in parts if o is not None}.values():
                    if hasattr(obj, "num_replicas") and hasattr(obj, "rank"):
                        obj.num_replicas, obj.rank = trainer.world_size, trainer.global_rank

    return RankAwareLoaders()

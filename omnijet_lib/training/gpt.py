"""Generative pre-training of the GPT backbone: next-token prediction on token sequences.

Sequences come from the tokenizer: start 0, code+1 (1..K), stop K+1, padded after stop with
``mask == False`` (the mask covers start..stop). Batches are length-bucketed and trimmed to their
longest sequence (:func:`omnijet_lib.training.make_loader`), and the loss evaluates the output
head on real positions only (:meth:`GPT.loss`): ~3x fewer FLOPs than padding every batch to
130 positions when jets have ~40 constituents (benchmarks/gpt_training.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from ..io import OmnijetError, load_model, save_model
from ..models.gpt import GPT, GPTConfig, check_sequences, insert_class_token, target_mask  # check_sequences: re-exported
from .batching import PaddedDataset, make_loader
from .fit import TrainConfig, first_epoch_factor, fit, lr_scheduler, one_cycle
from .store import ModelRequest, ModelStore, Run, data_identity, find_run, tokenizer_run_of

__all__ = ["GPTModule", "train_gpt", "load_gpt", "check_sequences", "gpt_settings", "ensure_gpt", "GPT_FILE",
           "Backbone", "open_backbone", "ensure_gpt_on_shards"]

GPT_FILE = "gpt.safetensors"  # the weights in a run folder
TRAIN_ONLY = (None, "head")  # what trains: everything, or the output head alone (GPTModule)


class GPTModule(pl.LightningModule):
    """Lightning wrapper: next-token cross-entropy, AdamW; ``loss_over_padding``: the official
    loss over every position.

    ``schedule`` "one_cycle" (default): lr follows a one-cycle policy over the optimiser steps
    (warm-up over 30%, cosine decay to ~0). "official": constant lr, × ``first_epoch_lr_factor``
    in the first epoch. With a constant lr the end state depends on the last batches, which with
    length-bucketed batches hold jets of one length: on the quick combined backbone (10k jets,
    K 512, 8 epochs) one-cycle lowered the classifier-test AUC from 0.734 to 0.678.

    The training loss is the sum over a batch's targets divided by ``batch size ×
    targets_per_jet`` (the training set's mean), not by the batch's own target count: with
    length-bucketed batches the latter would weight every target of a short-jet batch more than
    one of a long-jet batch, and the model learns a stop probability that is too high early and
    too low late: on a toy whose true lengths are known (mean 42.8), generated jets came out with
    a mean of 37.6; with this normalisation 41.7, as with unbucketed batches. ``val_loss`` stays the
    mean per target.

    A model with classes (``config.n_classes``) reads the batches' ``labels``: each jet gets its class
    token, except a random ``class_dropout`` share of them (drawn anew every step) that train the
    unconditional model; validation always gives the class.

    ``train_only="head"``: only the output head (hidden state -> next-token logits) trains, the
    embedding and the blocks stay as they are (generative fine-tuning with a frozen backbone)."""

    def __init__(self, config: GPTConfig, lr: float = 1e-3, weight_decay: float = 1e-2,
                 loss_over_padding: bool = False, first_epoch_lr_factor: float = 1.0,
                 targets_per_jet: float | None = None, schedule: str = "one_cycle", class_dropout: float = 0.0,
                 train_only: str | None = None):
        super().__init__()
        if config.n_classes and loss_over_padding:
            raise OmnijetError("a GPT with classes trains with the loss over real tokens only (loss_over_padding false)")
        _check_train_only(train_only)
        self.model = GPT(config)
        if train_only == "head":
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        self.lr, self.weight_decay = lr, weight_decay
        self.loss_over_padding, self.first_epoch_lr_factor = loss_over_padding, first_epoch_lr_factor
        self.targets_per_jet, self.schedule, self.class_dropout = targets_per_jet, schedule, class_dropout

    def _inputs(self, batch, dropout: float = 0.0):
        x, mask = batch["x"], batch["mask"]
        if not self.model.config.n_classes:
            return x, mask
        labels = batch["labels"]
        if dropout:
            labels = labels.masked_fill(torch.rand(len(labels), device=labels.device) < dropout, -1)
        return insert_class_token(x, mask, labels, self.model.config.vocab_size)

    def training_step(self, batch, batch_idx):
        x, mask = self._inputs(batch, self.class_dropout)
        loss = self.model.loss(x, mask, over_padding=self.loss_over_padding)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
        if self.targets_per_jet and not self.loss_over_padding:
            loss = loss * target_mask(x, mask, self.model.config.vocab_size).sum() / (len(x) * self.targets_per_jet)
        return loss

    def validation_step(self, batch, batch_idx):
        x, mask = self._inputs(batch)
        loss = self.model.loss(x, mask, over_padding=self.loss_over_padding)
        self.log("val_loss", loss, prog_bar=True, batch_size=len(x), sync_dist=True)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "official":
            return lr_scheduler(opt, first_epoch_factor(self.first_epoch_lr_factor))
        return lr_scheduler(opt, one_cycle(self.trainer.estimated_stepping_batches), "step")


def _check_train_only(train_only) -> None:
    if train_only not in TRAIN_ONLY:
        raise OmnijetError(f"train_only must be None or 'head', got {train_only!r}")


def train_gpt(seq, seq_mask, out_dir: str | os.PathLike, config: GPTConfig | None = None,
              epochs: int | None = None, batch_size: int = 256, train_config: TrainConfig | None = None,
              seed: int = 0, val_fraction: float = 0.1, lr: float = 1e-3, labels=None, class_dropout: float = 0.1,
              init: GPT | None = None, train_only: str | None = None) -> GPT:
    """Train a GPT on tokenizer sequences ``seq`` (N, L<=max_len) int with ``seq_mask`` (N, L).

    ``val_fraction`` of the jets (random, fixed by ``seed``) are held out for ``val_loss``; the
    weights with the lowest ``val_loss`` are returned and saved to ``out_dir/gpt.safetensors``.
    ``epochs`` overrides ``train_config.max_epochs``; ``seed`` sets the split, the batch order
    and Lightning's seed. A rerun with the same ``out_dir`` resumes from ``last.ckpt``.
    ``labels`` (N,) class ids train a model with ``config.n_classes`` (``class_dropout`` of the jets
    without their class every step). ``init``: a GPT of the same config whose weights the training
    starts from (fine-tuning) instead of a random initialisation; ``train_only="head"`` trains its
    output head alone (:class:`GPTModule`).
    """
    config = config or GPTConfig()
    seq, seq_mask = check_sequences(seq, seq_mask, config.vocab_size, config.max_len)
    extra = _class_labels(labels, len(seq), config, class_dropout)
    if not 0 <= val_fraction < 1:
        raise OmnijetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cfg = dataclasses.replace(train_config or TrainConfig(), seed=seed)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, max_epochs=epochs)

    order = np.random.default_rng(seed).permutation(len(seq))
    n_val = int(round(val_fraction * len(seq))) if len(seq) > 1 else 0
    if val_fraction > 0:
        n_val = max(n_val, 1)
    val, train = order[:n_val], order[n_val:]
    bucket = cfg.batching == "bucketed"
    train_loader = make_loader(PaddedDataset(seq[train], seq_mask[train], **{k: v[train] for k, v in extra.items()}),
                               batch_size, shuffle=True, seed=seed, bucket=bucket)
    val_loader = (make_loader(PaddedDataset(seq[val], seq_mask[val], **{k: v[val] for k, v in extra.items()}),
                              batch_size, shuffle=False, bucket=bucket) if n_val else None)

    module = GPTModule(config, lr=lr, loss_over_padding=cfg.loss_over_padding,
                       first_epoch_lr_factor=cfg.first_epoch_lr_factor, schedule=cfg.schedule,
                       targets_per_jet=float(np.asarray(seq_mask[train])[:, 1:].sum(1).mean()) if len(train) else None,
                       class_dropout=class_dropout if extra else 0.0, train_only=train_only)
    if init is not None:
        if init.config != config:
            raise OmnijetError(f"init: the GPT to start from has another config ({init.config}) than {config}")
        module.model.load_state_dict(init.state_dict())
    module = fit(module, train_loader, val_loader, out_dir=out_dir, config=cfg)
    model = module.model.cpu().eval()
    save_model(Path(out_dir) / GPT_FILE, model)
    return model


def _class_labels(labels, n: int, config: GPTConfig, class_dropout: float) -> dict:
    """``{"labels": (n,) int64}`` for a GPT with classes, ``{}`` without; checked."""
    if not config.n_classes:
        if labels is not None:
            raise OmnijetError("labels given for a GPT without classes: set n_classes in its config")
        return {}
    labels = None if labels is None else np.asarray(labels)
    if labels is None or labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (
            n and (labels.min() < 0 or labels.max() >= config.n_classes)):
        raise OmnijetError(f"a GPT with {config.n_classes} classes needs labels: {n} class ids in 0..{config.n_classes - 1}")
    if not 0 <= class_dropout < 1:
        raise OmnijetError(f"class_dropout must be in [0, 1), got {class_dropout}")
    return {"labels": labels.astype(np.int64)}


def gpt_settings(config: GPTConfig, epochs: int | None = None, batch_size: int = 256,
                 train_config: TrainConfig | None = None, seed: int = 0, lr: float = 1e-3,
                 class_dropout: float | None = None) -> tuple[dict, TrainConfig]:
    """``(settings, train config)``: everything besides the sequences that decides what
    :func:`train_gpt` gives, as the model store records it (``class_dropout``: of a GPT with classes)."""
    cfg = dataclasses.replace(train_config or TrainConfig(), seed=seed,
                              **({"max_epochs": epochs} if epochs is not None else {}))
    conf = dataclasses.asdict(config)
    if not config.n_classes:
        del conf["n_classes"]  # the settings (and store hashes) of the GPTs from before classes existed
    settings = {"config": conf, "batch_size": int(batch_size), "lr": lr, "trainer": cfg.settings}
    return settings | ({"class_dropout": class_dropout} if config.n_classes else {}), cfg


def ensure_gpt(store: ModelStore, name: str, seq, seq_mask, config: GPTConfig, source: dict,
               epochs: int | None = None, batch_size: int = 256, train_config: TrainConfig | None = None,
               seed: int = 0, lr: float = 1e-3, labels=None, class_dropout: float = 0.1, init: Run | None = None,
               train_only: str | None = None):
    """``(GPT, Run)``: the GPT ``name`` of ``store`` trained with exactly these settings on exactly
    these sequences (``source`` says where they come from; ``labels`` for a GPT with classes),
    trained there (resumably) when there is none; :func:`train_gpt`'s arguments. ``init``: the
    store run of a GPT to start from (generative fine-tuning); its identity is part of the request.
    ``train_only="head"``: only the output head trains (recorded only when set)."""
    _check_train_only(train_only)
    settings, cfg = gpt_settings(config, epochs, batch_size, train_config, seed, lr, class_dropout)
    if init is not None:
        settings["init"] = init.settings_hash
    if train_only is not None:
        settings["train_only"] = train_only
    arrays = [np.asarray(seq, np.int64), np.asarray(seq_mask, bool)]
    if labels is not None:
        arrays.append(np.asarray(labels, np.int64))
    request = ModelRequest(name, settings, data_identity(source, *arrays))
    start = None if init is None else load_gpt(init.path / GPT_FILE, vocab_size=config.vocab_size)
    return store.get(request,
                     train=lambda run: train_gpt(seq, seq_mask, run, config=config, batch_size=batch_size,
                                                 train_config=cfg, seed=seed, lr=lr, labels=labels,
                                                 class_dropout=class_dropout, init=start, train_only=train_only),
                     load=lambda run: load_gpt(run / GPT_FILE, vocab_size=config.vocab_size))


def ensure_gpt_on_shards(store: ModelStore, name: str, shards, config: GPTConfig, classes=None,
                         epochs: int | None = None, batch_size: int = 256, train_config: TrainConfig | None = None,
                         seed: int = 0, lr: float = 1e-3, num_workers: int = 0, fraction: float = 1.0,
                         tokenizer=None):
    """``(GPT, Run)`` like :func:`ensure_gpt`, pre-trained on the token shards of folder ``shards``
    (``omnijet tokenize``), streamed: memory bounded by a shard and a shuffle buffer, and under DDP
    every rank reads other shards (:class:`~omnijet_lib.data.shards.TokenShardDataset`). The data
    identity is the manifest's shards (name and sha256), their tokenizer and ``classes``; without a
    validation set the weights of the last epoch are kept. ``fraction`` < 1 trains on that share
    of the shards (a random subset; data scaling). ``tokenizer``, a store :class:`Run`, must be the
    one the shards were made with."""
    from ..data.shards import ShardLoader, TokenShardDataset, read_manifest, read_shard
    from ..io import file_sha256

    manifest = read_manifest(shards)
    tok = Path(manifest.get("tokenizer", ""))
    tok_id = tok.parent.name if (tok.parent / "run.json").is_file() else (file_sha256(tok) if tok.is_file() else None)
    if tokenizer is not None and tok_id != tokenizer.settings_hash:
        raise OmnijetError(f"{shards}: tokenized with {tok}, not with the profile's tokenizer {tokenizer.path}; "
                           f"tokenize again: omnijet tokenize --tokenizer {tokenizer.path}/tokenizer.safetensors ...")
    listed = manifest["shards"]
    if fraction < 1:
        rng = np.random.default_rng([seed, round(fraction * 1e6)])
        listed = [listed[i] for i in sorted(rng.choice(len(listed), max(1, round(fraction * len(listed))),
                                                       replace=False))]
    ds = TokenShardDataset([Path(shards) / s["name"] for s in listed], batch_size, num_codes=config.vocab_size - 2,
                           seed=seed, classes=classes)
    targets = 0  # the training set's targets (codes and stop) per jet normalise the loss
    for p in ds.paths:
        d = read_shard(p, fields=("counts", "labels"))
        keep = np.ones(len(d["labels"]), bool) if classes is None else np.isin(d["labels"], classes)
        targets += int((d["counts"][keep].astype(np.int64) + 1).sum())
    source = {"shards": [{"name": s["name"], "sha256": s["sha256"]} for s in listed],
              "classes": None if classes is None else sorted(int(c) for c in classes), "tokenizer": tok_id}
    settings, cfg = gpt_settings(config, epochs, batch_size, train_config, seed, lr)

    def train(run: Path) -> GPT:
        module = GPTModule(config, lr=lr, loss_over_padding=cfg.loss_over_padding,
                           first_epoch_lr_factor=cfg.first_epoch_lr_factor, schedule=cfg.schedule,
                           targets_per_jet=float(targets) / max(ds.num_jets, 1))
        module = fit(module, ShardLoader(ds, num_workers=num_workers), None, out_dir=run, config=cfg,
                     callbacks=[_ShardReport(ds, store.progress)])
        model = module.model.cpu().eval()
        save_model(run / GPT_FILE, model)
        return model

    request = ModelRequest(name, {**settings, "streamed": True}, {"source": source, "jets": ds.num_jets})
    return store.get(request, train=train, load=lambda run: load_gpt(run / GPT_FILE, vocab_size=config.vocab_size))


class _ShardReport(pl.Callback):
    """Says which shards each rank reads, every epoch (the DDP split can be checked from the log)."""

    def __init__(self, dataset, progress):
        self.dataset, self.progress = dataset, progress

    def on_train_epoch_start(self, trainer, pl_module):
        names = self.dataset.rank_shards()
        self.progress(f"rank {trainer.global_rank}/{trainer.world_size} epoch {trainer.current_epoch}: "
                      f"{len(names)} shards: {' '.join(names)}")


def load_gpt(path: str | os.PathLike, vocab_size: int | None = None, device: str = "cpu") -> GPT:
    """Load a GPT saved by :func:`train_gpt`; ``vocab_size`` (K + 2 of the tokenizer in use) is
    checked against the checkpoint."""
    model, _ = load_model(path, GPT, GPTConfig, device=device)
    have = model.config.vocab_size
    if vocab_size is not None and have != vocab_size:
        raise OmnijetError(f"{path}: GPT vocabulary is {have} ({have - 2} codes + start/stop) but the "
                           f"tokenizer needs {vocab_size} ({vocab_size - 2} codes); retrain the GPT "
                           f"with this tokenizer")
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A pre-trained backbone of the model store with the tokenizer its sequences come from."""

    gpt: GPT
    tokenizer: torch.nn.Module
    run: Path  # the backbone's run folder
    tokenizer_run: Path


def open_backbone(backbone: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                  store: str | os.PathLike | None = None, device: str = "cpu") -> Backbone:
    """The backbone run ``backbone`` (a run folder or model folder of a store; ``"published"``: the
    converted published backbone of ``store``) and its tokenizer: the run its record names, or
    ``tokenizer``. The two must agree on the codebook size."""
    from ..tokenizers.base import load_tokenizer
    from .vqvae import TOKENIZER_FILE

    if str(backbone) == "published":
        if store is None or not (Path(store) / "published_gpt_combined").is_dir():
            raise OmnijetError(f"--backbone published: no converted published backbone in --store {store}; run "
                               "omnijet checkpoints fetch --dest DIR, then omnijet checkpoints convert DIR STORE")
        backbone = Path(store) / "published_gpt_combined"
    run = find_run(backbone, "--backbone")
    if not (run / GPT_FILE).is_file():
        raise OmnijetError(f"--backbone {run}: holds no {GPT_FILE}; is it a backbone run?")
    tok_run = find_run(tokenizer, "--tokenizer") if tokenizer is not None else tokenizer_run_of(run)
    if not (tok_run / TOKENIZER_FILE).is_file():
        raise OmnijetError(f"--tokenizer {tok_run}: holds no {TOKENIZER_FILE}; is it a tokenizer run?")
    tok = load_tokenizer(tok_run / TOKENIZER_FILE).to(device).eval()
    gpt = load_gpt(run / GPT_FILE, vocab_size=tok.vocab_size, device=device)
    return Backbone(gpt, tok, run, tok_run)

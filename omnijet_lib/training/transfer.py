"""Transfer learning from generation to classification (paper section III C, figure 7).

A GPT backbone pre-trained to *generate* jets (next-token prediction) gets a classification
head (:class:`~omnijet_lib.models.classifier.GPTClassifier`) and is trained to separate two jet
classes (paper: t->bqq' vs q/g) with three strategies:

* ``from_scratch``: backbone and head randomly initialised (same architecture), the baseline;
* ``frozen``: pre-trained backbone fixed, only the head trained ("fine-tuning, backbone fixed");
* ``finetune``: pre-trained backbone and new head trained together.

Paper settings (appendix): AdamW with a constant learning rate 1e-4 and weight decay 1e-2 for
all three strategies (from scratch included); early stopping on the validation loss with a
patience of 20 epochs up to 10k training jets, 10 up to 1M, 5 above; the epoch with the lowest
validation loss is evaluated; five seeds per training size. Every run goes through
:func:`~omnijet_lib.training.classifier.train_classifier` (one training loop for all
classifiers). The study over training sizes, strategies and seeds (notebook 03) is
:mod:`omnijet_lib.studies.transfer`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..io import OmnijetError
from ..metrics import roc_auc
from ..models.classifier import GPTClassifier, backbone_config_of
from .classifier import predict_proba, train_classifier
from .fit import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES", "STRATEGY_LABELS", "paper_patience", "make_transfer_model", "train_transfer", "evaluate",
]

STRATEGIES = ("from_scratch", "frozen", "finetune")
STRATEGY_LABELS = {"from_scratch": "From scratch", "frozen": "Fine-tuning (backbone fixed)",
                   "finetune": "Fine-tuning"}


def paper_patience(n_train: int) -> int:
    """Early-stopping patience of the paper for a training-set size: 20 / 10 / 5 epochs."""
    return 20 if n_train <= 10_000 else 10 if n_train <= 1_000_000 else 5


# ---------------------------------------------------------------------------- data
def make_transfer_model(strategy: str, backbone_path, tokenizer_vocab: int | None = None, seed: int = 0,
                        head_init: str = "zero", n_classes: int = 2):
    """``(model, trainable parameters)`` for a strategy. The from-scratch model has the
    architecture of the pre-trained backbone but random weights."""
    if strategy not in STRATEGIES:
        raise OmnijetError(f"strategy {strategy!r} is unknown, expected one of {', '.join(STRATEGIES)}")
    torch.manual_seed(seed)
    if strategy == "from_scratch":
        cfg = backbone_config_of(backbone_path)
        if tokenizer_vocab is not None and cfg.vocab_size != tokenizer_vocab:
            raise OmnijetError(f"{backbone_path}: backbone vocabulary is {cfg.vocab_size} but the tokenizer "
                               f"gives {tokenizer_vocab}")
        model = GPTClassifier(cfg, n_classes=n_classes, head_init=head_init)
        return model, list(model.parameters())
    model = GPTClassifier.from_pretrained(backbone_path, tokenizer_vocab=tokenizer_vocab, n_classes=n_classes,
                                          head_init=head_init)
    params = model.freeze_backbone() if strategy == "frozen" else list(model.parameters())
    return model, params


def train_transfer(strategy: str, seq, mask, y, val, backbone_path, tokenizer_vocab: int | None = None,
                   out_dir=None, max_epochs: int = 100, patience: int | None = None, lr: float = 1e-4,
                   weight_decay: float = 1e-2, batch_size: int = 64, trainer: dict | None = None,
                   seed: int = 0, n_classes: int = 2) -> GPTClassifier:
    """Train one classifier with ``strategy`` on sequences ``seq`` (N, T) / ``mask`` with labels
    ``y``; ``val = (seq, mask, y)`` drives early stopping (``patience`` epochs, default
    :func:`paper_patience`) and the best-epoch restore; labels 0 .. ``n_classes`` - 1. Returns the model with the best weights.
    ``out_dir`` keeps the checkpoints (resumable); ``None`` uses a temporary folder."""
    patience = paper_patience(len(seq)) if patience is None else patience
    cfg = TrainConfig.from_params(trainer, max_epochs=max_epochs, seed=seed, patience=patience,
                                  progress_bar=False)
    model, params = make_transfer_model(strategy, backbone_path, tokenizer_vocab, seed, head_init=cfg.head_init,
                                        n_classes=n_classes)
    with tempfile.TemporaryDirectory(prefix="omnijet_transfer_") as tmp, _quiet_lightning():
        model = train_classifier(model, seq, mask, y, val=val, out_dir=out_dir or tmp, batch_size=batch_size,
                                 lr=lr, weight_decay=weight_decay, train_config=cfg, epochs=None, seed=seed, params=params)
    return model.cpu().eval()


@contextlib.contextmanager
def _quiet_lightning():
    """A study runs many short trainings: keep Lightning's per-run banners out of the output."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", ".*is deprecated.*")
            yield
    finally:
        logger.setLevel(level)


@torch.no_grad()
def evaluate(model, seq, mask, y) -> dict:
    """Accuracy, AUC and mean cross-entropy of a classifier on ``(seq, mask, y)``. Binary: the AUC
    of the class-1 probability; more classes: the mean of the one-vs-rest AUCs (``auc``) and
    each class's (``auc_per_class``)."""
    p = predict_proba(model, seq, mask)
    y = np.asarray(y)
    loss = F.nll_loss(torch.log(torch.as_tensor(p).clamp_min(1e-12)), torch.as_tensor(y)).item()
    out = {"accuracy": float((p.argmax(1) == y).mean()), "loss": loss}
    if p.shape[1] == 2:
        return {**out, "auc": roc_auc(y, p[:, 1])}
    per_class = [roc_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    return {**out, "auc": float(np.nanmean(per_class)), "auc_per_class": per_class}


# ---------------------------------------------------------------------------- the study

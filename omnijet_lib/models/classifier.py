"""Jet classifier on the OmniJet-alpha GPT backbone (paper section III C, figure 7).

The next-token head of the generative model is replaced by a classification head: per token
ReLU(Linear 256 -> 256), a sum over the real tokens (start ... stop) and Linear(256 -> 2). The
backbone (embedding + causal transformer blocks, :class:`~omnijet_lib.models.gpt.GPT`) is kept
as it is, so pre-trained weights load unchanged (:meth:`GPTClassifier.from_pretrained`).
Inputs are the tokenizer's sequences ``(seq, mask)`` (start 0, code + 1, stop K + 1).
The last layer is zero-initialised by default (see :class:`GPTClassifier`; ``head_init="default"``
is the official PyTorch initialisation); the architecture is the paper's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from ..io import OmnijetError, load_checkpoint
from .gpt import GPT, GPTConfig

__all__ = ["ClassifierHeadConfig", "GPTClassifierConfig", "GPTClassifier", "backbone_config_of", "load_classifier"]


@dataclass
class ClassifierHeadConfig:
    n_embd: int = 256      # backbone width (input of the head)
    hidden: int = 256      # per-token layer (GPTClassifier's default: the backbone width)
    n_classes: int = 2


@dataclass
class GPTClassifierConfig:
    """What a saved classifier records: its backbone's and its head's configs (as dicts)."""

    backbone: dict
    head: dict

    def __post_init__(self):  # a config that does not fit fails here, as a TypeError load_model reports
        GPTConfig(**self.backbone), ClassifierHeadConfig(**self.head)


def backbone_config_of(gpt_path: str | os.PathLike) -> GPTConfig:
    """The :class:`GPTConfig` recorded in a GPT checkpoint (no weights are built)."""
    _, meta = load_checkpoint(gpt_path)  # a readable safetensors file? (raises a clear error)
    if meta.get("class", "GPT") != "GPT":
        raise OmnijetError(f"{gpt_path}: holds a {meta['class']}, expected a GPT backbone (gpt.safetensors)")
    try:
        return GPTConfig(**meta.get("config", {}))
    except TypeError as err:
        raise OmnijetError(f"{gpt_path}: saved config does not fit GPTConfig ({err})") from None


class GPTClassifier(nn.Module):
    """GPT backbone + classification head: ``forward(seq, mask) -> logits (B, n_classes)``."""

    def __init__(self, backbone_config: GPTConfig | GPTClassifierConfig | None = None, n_classes: int = 2,
                 head_config: ClassifierHeadConfig | None = None, head_init: str = "zero"):
        super().__init__()
        if isinstance(backbone_config, GPTClassifierConfig):  # rebuilt from a saved classifier
            head_config = ClassifierHeadConfig(**backbone_config.head)
            backbone_config = GPTConfig(**backbone_config.backbone)
        self.backbone_config = bcfg = backbone_config or GPTConfig()
        # paper: hidden = width = 256; a smaller backbone gets a head of its own width
        self.head_config = hcfg = head_config or ClassifierHeadConfig(bcfg.n_embd, bcfg.n_embd, n_classes)
        if hcfg.n_embd != bcfg.n_embd:
            raise OmnijetError(f"classifier head expects width {hcfg.n_embd}, backbone has {bcfg.n_embd}")
        self.gpt = GPT(bcfg)
        self.gpt.head = None  # the next-token head is not part of the classifier
        self.token_mlp = nn.Linear(hcfg.n_embd, hcfg.hidden)
        self.out = nn.Linear(hcfg.hidden, hcfg.n_classes)
        # Training starts from p = 1/n_classes: with default init, the sum over ~50 tokens gives
        # logits of |z| ~ 5 at random, the validation loss is dominated by confident mistakes and
        # early stopping on it picks the first epoch (measured: epoch 1 at 70% val accuracy).
        if head_init == "zero":
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        elif head_init != "default":
            raise OmnijetError(f"head_init must be 'zero' or 'default', got {head_init!r}")

    @property
    def config(self) -> GPTClassifierConfig:  # what save_model records
        return GPTClassifierConfig(dataclasses.asdict(self.backbone_config), dataclasses.asdict(self.head_config))

    def forward(self, seq, mask):  # seq (B, T) ids, mask (B, T) bool -> (B, n_classes)
        h = self.gpt.backbone(seq, mask)                       # (B, T, C), zeros at padding
        h = F.relu(self.token_mlp(h)) * mask[..., None]        # (B, T, H): padding contributes nothing
        return self.out(h.sum(1))                              # (B, n_classes)

    # ------------------------------------------------------------------ strategies
    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.gpt.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.token_mlp.parameters()) + list(self.out.parameters())

    def freeze_backbone(self) -> list[nn.Parameter]:
        """Fix the backbone weights (no gradients); returns the parameters left to train."""
        for p in self.gpt.parameters():
            p.requires_grad_(False)
        return self.head_parameters()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, gpt_path: str | os.PathLike, tokenizer_vocab: int | None = None,
                        n_classes: int = 2, backbone_config: GPTConfig | None = None,
                        head_init: str = "zero") -> "GPTClassifier":
        """A classifier whose backbone is copied from a GPT checkpoint (:func:`train_gpt`); the
        head is freshly initialised.

        ``tokenizer_vocab`` (K + 2 of the tokenizer that makes the sequences) must equal the
        GPT's vocabulary; ``backbone_config``, when given, must equal the checkpoint's config.
        Any mismatch raises :class:`OmnijetError` naming the file and what differs.
        """
        from ..io import load_model

        saved = dataclasses.asdict(backbone_config_of(gpt_path))
        if tokenizer_vocab is not None and saved["vocab_size"] != tokenizer_vocab:
            have = saved["vocab_size"]
            raise OmnijetError(
                f"{gpt_path}: backbone vocabulary is {have} ({have - 2} codes + start/stop) but the "
                f"tokenizer gives {tokenizer_vocab} ({tokenizer_vocab - 2} codes); use the backbone "
                f"trained with this tokenizer")
        if backbone_config is not None:
            want = dataclasses.asdict(backbone_config)
            diff = [f"{k} {saved[k]} (checkpoint) vs {v} (expected)" for k, v in want.items() if saved[k] != v]
            if diff:
                raise OmnijetError(f"{gpt_path}: backbone config differs: {'; '.join(diff)}")
        # load_model checks the model class, every tensor shape against the config and that no
        # weight is missing or unexpected
        gpt, _ = load_model(gpt_path, GPT, GPTConfig)
        model = cls(gpt.config, n_classes=n_classes, head_init=head_init)
        state = {k: v for k, v in gpt.state_dict().items() if not k.startswith("head.")}
        model.gpt.load_state_dict(state, strict=True)
        return model


def load_classifier(path: str | os.PathLike, device: str = "cpu") -> tuple[GPTClassifier, dict]:
    """``(classifier, extra config)`` saved by ``save_model(path, classifier, **extra)``: every
    tensor is checked against the recorded configs before the model is built."""
    from ..io import load_model

    model, meta = load_model(path, GPTClassifier, GPTClassifierConfig, device=device)
    return model.eval(), {k: v for k, v in meta.items() if k not in ("class", "config")}

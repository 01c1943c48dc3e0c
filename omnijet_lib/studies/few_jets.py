"""A pre-trained backbone with few jets (notebook 07): generative fine-tuning and ten-class tagging.

Generative fine-tuning: a backbone pre-trained on (mostly) q/g jets learns to generate t→bqq' jets
from N of them (:func:`finetune_generation`), against the same GPT trained from scratch on the same
N jets with the same optimiser steps; each generator is judged on held-out jets
(:func:`judge_generator`), and the W1 distances against N follow a power law (:func:`power_law_fit`).
Ten-class tagging: the all-class backbone fine-tuned as a classifier of the ten JetClass classes
(:func:`~omnijet_lib.studies.finetune.finetune_sequences`) and scored with :func:`tagging_metrics`:
accuracy, confusion matrix and the background rejection at a fixed signal efficiency.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..data import CLASS_LABELS
from ..io import OmnijetError
from .anomaly import efficiency_cut

__all__ = ["GENERATION_METHODS", "mixed_jets", "per_class_subset", "finetune_generation", "mixed_backbone",
           "judge_generator", "power_law_fit", "rejection_at_efficiency", "class_rejections", "confusion_matrix",
           "tagging_metrics"]

#: generative fine-tuning methods: the pre-trained backbone each starts from (``"qcd"``, ``"qcd_mixed"``
#: of :func:`mixed_backbone`; None: from scratch) and what trains (``"head"``: the output head alone)
GENERATION_METHODS = {"finetune": ("qcd", None), "finetune_mixed": ("qcd_mixed", None), "scratch": (None, None),
                      "frozen": ("qcd", "head")}


def mixed_jets(labels, share: float, background: int = 0, signal: int = 8) -> np.ndarray:
    """Indices (sorted) of the ``background`` jets with ``share`` of them replaced by ``signal`` jets:
    as many jets as there are background jets, a round(share x n) of them the *last* signal jets (the
    first ones stay free for fine-tuning, :func:`per_class_subset` on the others). Unlabelled
    pre-training data as open data has it: mostly q/g, a little top."""
    labels = np.asarray(labels)
    bkg, sig = np.flatnonzero(labels == background), np.flatnonzero(labels == signal)
    if not 0 <= share < 1:
        raise OmnijetError(f"mixed_jets: share {share} is not in [0, 1)")
    k = round(share * len(bkg))
    if k > len(sig):
        raise OmnijetError(f"mixed_jets: {k} {CLASS_LABELS[signal]} jets asked for, {len(sig)} available")
    return np.sort(np.concatenate([bkg[:len(bkg) - k], sig[len(sig) - k:]]))


def per_class_subset(labels, pool, n_per_class: int, seed: int, classes=None) -> np.ndarray:
    """``n_per_class`` jets of every class in ``classes`` (default: those in the pool) from the indices
    ``pool``, sorted; nested in ``n_per_class`` for a fixed seed (the first n of a per-class permutation)."""
    labels, pool = np.asarray(labels), np.asarray(pool)
    classes = np.unique(labels[pool]) if classes is None else classes
    rng = np.random.default_rng([seed, 71])
    out = []
    for c in classes:
        have = rng.permutation(pool[labels[pool] == c])
        if len(have) < n_per_class:
            raise OmnijetError(f"{n_per_class} jets of {CLASS_LABELS[c]} asked for, the pool has {len(have)}")
        out.append(have[:n_per_class])
    return np.sort(np.concatenate(out))


def finetune_generation(store, name: str, seq, mask, config, source: dict, *, steps: int, batch_size: int,
                        lr: float, seed: int, train_config=None, init=None, train_only: str | None = None):
    """``(GPT, Run)``: a GPT of ``config`` trained for exactly ``steps`` optimiser steps (one-cycle lr
    peaking at ``lr``) on the token sequences ``(seq, mask)`` of N jets (90% train, 10% pick the
    best weights), as model ``name`` of ``store``: from the weights of the store run ``init``
    (generative fine-tuning; ``train_only="head"``: its output head alone) or, without, from
    scratch. Steps rather than epochs, so that every N and method gets the same compute."""
    from ..training.fit import TrainConfig
    from ..training.gpt import ensure_gpt

    if not isinstance(steps, int) or steps < 1:
        raise OmnijetError(f"steps must be an integer >= 1, got {steps!r}")
    n_train = len(seq) - max(1, round(0.1 * len(seq)))  # train_gpt's split
    if n_train < 1:
        raise OmnijetError(f"{name}: {len(seq)} jets are too few to train on (90% train, 10% validate)")
    epochs = math.ceil(steps / math.ceil(n_train / batch_size))  # enough: length buckets only add batches
    cfg = dataclasses.replace(train_config or TrainConfig(progress_bar=False), max_steps=steps)
    return ensure_gpt(store, name, seq, mask, config, source, epochs=epochs, batch_size=batch_size, train_config=cfg,
                      seed=seed, lr=lr, init=init, train_only=train_only)


def mixed_backbone(store, tok, tok_run, data, share: float):
    """``(GPT, Run, indices)``: the profile's q/g backbone (:func:`~omnijet_lib.studies.generation.profile_backbone`
    ``"qcd"``: same GPT, epochs, batch and seed) pre-trained instead on the q/g jets of ``data`` with
    ``share`` of them t→bqq' (:func:`mixed_jets`): as many jets, so the same optimiser steps.
    ``indices``: the jets of ``data`` it learnt from."""
    from ..training.gpt import ensure_gpt

    pick = mixed_jets(data.labels, share)
    _, args = data.gpt_args("qcd", tok.vocab_size)
    seq, seq_mask = tok.to_sequence(data.tokens(tok)[pick], data.mask[pick])
    source = {"jets": data.source, "classes": ["QCD", "Tbqq"], "tbqq_share": share, "tokenizer": tok_run.settings_hash}
    gpt, run = ensure_gpt(store, f"gpt_qcd_tbqq_{share:g}", seq, seq_mask, source=source, **args)
    return gpt, run, pick


def judge_generator(gpt, tok, n_generate: int, reference, truth, seed: int, reference_sequences=None,
                    deepsets_seeds=(), classifier_epochs: int = 20, train_config=None, batch_size: int = 256) -> dict:
    """Generate ``n_generate`` jets with ``gpt`` (uniforms seeded by ``seed``), decode them with
    ``tok`` and judge them (:func:`~omnijet_lib.studies.generation.judge_generation`) against
    ``reference`` (held-out jets reconstructed by ``tok``, ``(x, mask)``; with the DeepSets test
    when ``deepsets_seeds``) and, under ``"truth"``, against ``truth`` (the same jets' own
    constituents; boosted trees, W1 and medians only): how far the generator is from real jets.
    ``reference_sequences``: the held-out jets' token sequences ``(seq, mask)``, whose negative
    log-likelihood per token under ``gpt`` (``nll_per_token``, nats) is the generator's test loss."""
    import torch

    from ..models.gpt import log_likelihood
    from .generation import decode_generated, judge_generation

    seq, mask = gpt.generate(n_generate, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    gen = decode_generated(tok, seq, mask)
    out = judge_generation(*gen, *reference, deepsets_seeds=deepsets_seeds, classifier_epochs=classifier_epochs,
                           train_config=train_config)
    out["truth"] = judge_generation(*gen, *truth)
    out["mean_multiplicity"] = float(gen[1].sum(1).mean())
    if reference_sequences is not None:
        ll = log_likelihood(gpt, *reference_sequences)
        out["nll_per_token"] = float(-ll["total"].sum() / ll["n_tokens"].sum())
    return out


def power_law_fit(n, y) -> dict:
    """Least-squares straight line in log-log, ``y = amplitude x n^-exponent``: ``{"exponent",
    "amplitude"}`` (exponent > 0 for a falling curve). Needs two or more distinct ``n`` and ``y`` > 0."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    if n.shape != y.shape or len(np.unique(n)) < 2:
        raise OmnijetError(f"power_law_fit: needs points at two or more sizes, got n {n.tolist()}")
    if (n <= 0).any() or (y <= 0).any() or not np.isfinite(y).all():
        raise OmnijetError(f"power_law_fit: n and y must be positive and finite, got y {y.tolist()}")
    slope, intercept = np.polyfit(np.log(n), np.log(y), 1)
    return {"exponent": float(-slope), "amplitude": float(np.exp(intercept))}


def rejection_at_efficiency(is_signal, score, efficiency: float = 0.5) -> float:
    """Background rejection 1/ε_B of the cut ``score >= t`` that keeps ``efficiency`` of the signal.
    With no background jet above the cut, the rejection is at least the number of background jets:
    that lower bound is returned (a finite test set cannot say more)."""
    is_signal, score = np.asarray(is_signal, bool), np.asarray(score, float)
    if not is_signal.any() or is_signal.all():
        raise OmnijetError("rejection_at_efficiency needs signal and background jets")
    if not 0 < efficiency <= 1:
        raise OmnijetError(f"rejection_at_efficiency: efficiency {efficiency} is not in (0, 1]")
    cut = efficiency_cut(score[is_signal], efficiency)
    background = score[~is_signal]
    return float(len(background) / max(int((background >= cut).sum()), 1))


def class_rejections(proba, labels, efficiency: float = 0.5, background: int | None = 0) -> dict[int, float]:
    """``{class: rejection}`` at ``efficiency`` for every class (:func:`rejection_at_efficiency`),
    from the probabilities ``proba`` (N, C). ``background`` a class index: JetClass's metric, that
    class's jets the background and the score p_c / (p_c + p_background) (every class but the
    background); None: one-vs-rest, the score p_c against every other jet."""
    proba, labels = np.asarray(proba, float), np.asarray(labels)
    out = {}
    for c in range(proba.shape[1]):
        if c == background or not (labels == c).any():
            continue
        if background is None:
            out[c] = rejection_at_efficiency(labels == c, proba[:, c], efficiency)
        else:
            sel = (labels == c) | (labels == background)
            score = proba[sel, c] / np.maximum(proba[sel, c] + proba[sel, background], 1e-30)
            out[c] = rejection_at_efficiency(labels[sel] == c, score, efficiency)
    return out


def confusion_matrix(labels, predicted, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) the share of the jets of true class i (row) predicted as j (column);
    a class without jets has a row of zeros."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    counts = np.bincount(labels * n_classes + predicted, minlength=n_classes ** 2).reshape(n_classes, n_classes)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)


def tagging_metrics(proba, labels, efficiency: float = 0.5) -> dict:
    """A multi-class tagger's probabilities ``proba`` (N, C) on jets of true ``labels``: ``accuracy``,
    ``confusion`` (:func:`confusion_matrix`, a list of rows), and the rejections at ``efficiency``
    (:func:`class_rejections`), against q/g (``rejection_vs_qcd``, JetClass's) and one-vs-rest;
    JSON-ready, classes by their JetClass names."""
    proba, labels = np.asarray(proba, float), np.asarray(labels)
    predicted = proba.argmax(1)
    names = CLASS_LABELS if proba.shape[1] == len(CLASS_LABELS) else [str(c) for c in range(proba.shape[1])]
    return {"accuracy": float((predicted == labels).mean()), "jets": int(len(labels)),
            "confusion": confusion_matrix(labels, predicted, proba.shape[1]).tolist(),
            "rejection_vs_qcd": {names[c]: r for c, r in class_rejections(proba, labels, efficiency, 0).items()},
            "rejection_one_vs_rest": {names[c]: r
                                      for c, r in class_rejections(proba, labels, efficiency, None).items()}}

"""The backbone as a density (notebook 06): a next-token model gives every jet an exact likelihood,
``log p(jet) = sum over its tokens of log p(token | the tokens before)``. A backbone pre-trained on
q/g jets only (the background an analysis has) then scores any jet: an improbable jet is an anomaly
candidate. The questions are the physicist's: does the likelihood know more than the simplest
observables (multiplicity, mass, τ32), does it still separate at fixed multiplicity (a longer jet has
more tokens, so a lower total likelihood), and does a cut on it sculpt the q/g mass?

Two backbones (q/g and t→bqq') also make a likelihood-ratio tagger, ``log p_top(jet) - log p_qcd(jet)``,
compared with a supervised classifier on the same jets, and checked for calibration: read as
``P(top) = sigmoid(ratio)`` for equal priors, is it over-confident?

Plain functions over numpy arrays; the notebook plots them.
"""

from __future__ import annotations

import numpy as np

from ..io import OmnijetError
from ..metrics import roc_auc

__all__ = ["SCORES", "anomaly_scores", "auc_table", "auc_at_fixed_multiplicity", "multiplicity_corrected",
           "efficiency_cut", "calibration"]

#: the anomaly scores, each oriented so that larger means "more signal-like" in the issue's table
SCORES = {"total": "total −log p", "per_token": "per-token −log p", "corrected": "−log p beyond n",
          "multiplicity": "multiplicity", "mass": "jet mass", "neg_tau32": "−τ32"}


def anomaly_scores(likelihood: dict, observables: dict, reference: dict | None = None) -> dict[str, np.ndarray]:
    """The scores of :data:`SCORES` per jet: the likelihood of the background model (as
    ``log_likelihood`` gives it: ``total``, ``per_token``), with ``reference`` (the likelihoods of
    other, fresh background jets) also the complexity-corrected one (:func:`multiplicity_corrected`
    over the number of tokens), and the baselines from ``jet_observables``."""
    out = {"total": -np.asarray(likelihood["total"], float), "per_token": -np.asarray(likelihood["per_token"], float)}
    if reference is not None:
        out["corrected"] = multiplicity_corrected(out["total"], likelihood["n_tokens"], -np.asarray(reference["total"]),
                                                  reference["n_tokens"])
    return {**out, "multiplicity": np.asarray(observables["multiplicity"], float),
            "mass": np.asarray(observables["mass"], float), "neg_tau32": -np.asarray(observables["tau32"], float)}


def auc_table(scores: dict, labels, background: int = 0) -> dict[int, dict[str, float]]:
    """``{class: {score: AUC of that class against the background}}`` for every other class in
    ``labels``; 0.5 is no separation, below 0.5 the score points the other way."""
    labels = np.asarray(labels)
    bkg = labels == background
    if not bkg.any():
        raise OmnijetError(f"auc_table: no background jets (class {background}) among the labels")
    out = {}
    for c in sorted(set(labels.tolist()) - {background}):
        sel = bkg | (labels == c)
        out[c] = {k: roc_auc(labels[sel] == c, v[sel]) for k, v in scores.items()}
    return out


def auc_at_fixed_multiplicity(score, multiplicity, labels, background: int = 0, n_bins: int = 4,
                              min_jets: int = 20) -> dict:
    """The AUC of ``score`` for each class against the background within bins of multiplicity
    (quantiles of the background's multiplicity, so every bin holds a share of it): what the score
    knows beyond the number of constituents. ``{"edges": (n_bins + 1,), "auc": {class: [per bin,
    nan where a bin holds fewer than min_jets of either]}, "mean": {class: jet-weighted mean}}``."""
    score, multiplicity, labels = (np.asarray(a) for a in (score, multiplicity, labels))
    bkg = labels == background
    edges = np.quantile(multiplicity[bkg], np.linspace(0, 1, n_bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    which = np.clip(np.searchsorted(edges, multiplicity, side="right") - 1, 0, n_bins - 1)
    out = {"edges": edges.tolist(), "auc": {}, "mean": {}}
    for c in sorted(set(labels.tolist()) - {background}):
        aucs, weights = [], []
        for b in range(n_bins):
            s, q = (labels == c) & (which == b), bkg & (which == b)
            if s.sum() < min_jets or q.sum() < min_jets:
                aucs.append(float("nan"))
                continue
            sel = s | q
            aucs.append(roc_auc(labels[sel] == c, score[sel]))
            weights.append((len(aucs) - 1, int(s.sum())))
        out["auc"][c] = aucs
        out["mean"][c] = (float(np.average([aucs[i] for i, _ in weights], weights=[w for _, w in weights]))
                          if weights else float("nan"))
    return out


def multiplicity_corrected(score, multiplicity, ref_score, ref_multiplicity, min_jets: int = 20) -> np.ndarray:
    """``score`` minus the mean ``ref_score`` of reference jets (fresh background jets, not those
    scored) of the same multiplicity: what a jet's likelihood says beyond its number of
    constituents, a complexity correction. Where fewer than ``min_jets`` reference jets share a
    multiplicity, the window around it widens until it holds that many."""
    score, multiplicity = np.asarray(score, float), np.asarray(multiplicity)
    ref_score, ref_multiplicity = np.asarray(ref_score, float), np.asarray(ref_multiplicity)
    if len(ref_score) < min_jets:
        raise OmnijetError(f"multiplicity_corrected: {len(ref_score)} reference jets, at least {min_jets} needed")
    mean = {}
    for m in np.unique(multiplicity):
        width = 0
        while (near := np.abs(ref_multiplicity - m) <= width).sum() < min_jets:
            width += 1
        mean[m] = ref_score[near].mean()
    return score - np.array([mean[m] for m in multiplicity])


def efficiency_cut(score, keep: float) -> float:
    """The threshold on ``score`` that keeps the fraction ``keep`` of these jets (score above it)."""
    if not 0 < keep <= 1:
        raise OmnijetError(f"efficiency {keep}: must be in (0, 1]")
    return float(np.quantile(np.asarray(score, float), 1 - keep))


def calibration(p, y, n_bins: int = 10) -> dict:
    """Reliability of probabilities ``p`` for binary truths ``y``: per bin of ``p`` (equal width) the
    mean prediction, the observed fraction of positives and the jet count, and the expected
    calibration error (the jet-weighted mean of |observed − predicted|)."""
    p, y = np.asarray(p, float), np.asarray(y).astype(bool)
    which = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    mean, frac, count = [], [], []
    for b in range(n_bins):
        sel = which == b
        count.append(int(sel.sum()))
        mean.append(float(p[sel].mean()) if sel.any() else float("nan"))
        frac.append(float(y[sel].mean()) if sel.any() else float("nan"))
    n = np.array(count)
    gap = np.abs(np.nan_to_num(np.array(frac) - np.array(mean)))
    return {"predicted": mean, "observed": frac, "jets": count, "ece": float((gap * n).sum() / max(n.sum(), 1))}

"""Token-quality evaluation (OmniJet-α figs 3, 4, 5, 8–11): plain functions over numpy arrays.

* :func:`token_blobs` — where each token lives in physical space. A conditional token's decoded
  value depends on the other tokens of the jet, so it is decoded ``samples`` times, each time in a
  "jet" of ``context`` randomly drawn codebook tokens (fig 3 blobs); an unconditional or binned
  token decodes to a single point.
* :func:`gaussian_fit` — σ of the core of a resolution (Δm, ΔpT, Δτ) by a Gaussian fit to
  its histogram, as the paper quotes σ(Δm).
* :func:`resolution_table` — per method, observable and class: the fitted μ, σ of
  reconstructed − original.
* :func:`codebook_usage` — fraction of codes used and perplexity of a token set.
* :func:`classifier_accuracy` — train a 10-class classifier (DeepSets or Transformer) on one
  representation of the jets and return its test accuracy (fig 5).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.features import ANGLE_SCALE, PT_SHIFT, features_to_p4
from ..data.jetclass import CLASS_LABELS
from ..io import OmnijetError
from ..tokenizers.base import reconstruct

__all__ = ["token_blobs", "to_physical", "blob_spread", "gaussian_fit", "resolution_table", "observables_of",
           "codebook_usage", "classifier_accuracy", "RESOLUTION_OBSERVABLES", "tokenizer_dir", "load_or_train_tokenizer"]

#: observables whose resolutions figs 4, 8–11 show (keys of ``jet_observables``)
RESOLUTION_OBSERVABLES = ("mass", "pt", "tau32", "tau21")


# --------------------------------------------------------------------------- fig 3
def token_blobs(tokenizer, samples: int = 500, context: int = 50, tokens=None, seed: int = 0,
                batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Decoded positions of codebook tokens: ``(token ids (T,), features (T, S, 3))``, scaled features.

    Conditional VQ-VAE: S = ``samples``; each sample of a token is decoded together with
    ``context`` other tokens drawn at random from the codebook. Each round shuffles the studied
    tokens and packs them into groups of ``context + 1`` (topped up with random codebook tokens),
    so one decoded group yields a sample for every studied token in it; if ``tokens`` is a random
    subset of the codebook, the context stays a uniform draw from the codebook.
    Unconditional / binned: S = 1, each token decoded alone.
    ``tokens`` (ids to study) defaults to the whole codebook.
    """
    K = tokenizer.num_codes
    ids = np.arange(K) if tokens is None else np.asarray(tokens, np.int64).ravel()
    if len(ids) == 0 or ids.min() < 0 or ids.max() >= K:
        raise OmnijetError(f"token_blobs: token ids must be a non-empty subset of 0..{K - 1}")
    if tokenizer.kind != "conditional":
        return ids, reconstruct(tokenizer, ids[:, None], batch_size=batch_size)  # (T, 1, 3)
    if samples < 1 or context < 0:
        raise OmnijetError(f"token_blobs: samples must be >= 1 and context >= 0 (got {samples}, {context})")
    rng = np.random.default_rng(seed)
    G = context + 1
    n_groups = -(-len(ids) // G)
    out = np.zeros((len(ids), samples, 3), np.float32)
    for s in range(samples):
        order = rng.permutation(len(ids))                               # studied positions, shuffled
        slots = np.full(n_groups * G, -1, np.int64)
        slots[:len(ids)] = order
        slots = slots.reshape(n_groups, G)                              # (groups, G) index into ids or -1
        group = np.where(slots >= 0, ids[np.maximum(slots, 0)], rng.integers(0, K, slots.shape))
        rec = reconstruct(tokenizer, group, batch_size=batch_size)      # (groups, G, 3)
        real = slots >= 0
        out[slots[real], s] = rec[real]
    return ids, out


def to_physical(x: np.ndarray) -> np.ndarray:
    """Scaled features (..., 3) -> (pT [GeV], η_rel, φ_rel)."""
    x = np.asarray(x, np.float64)
    return np.stack([np.exp(x[..., 0] + PT_SHIFT), x[..., 1] / ANGLE_SCALE, x[..., 2] / ANGLE_SCALE], -1)


def blob_spread(blobs: np.ndarray) -> np.ndarray:
    """Per-token standard deviation (T, 3) of the samples (T, S, 3) (zero for S = 1)."""
    return np.asarray(blobs).std(axis=1)


# --------------------------------------------------------------------------- resolutions
def _gauss(x, a, mu, sigma):
    return a * np.exp(-0.5 * ((x - mu) / sigma) ** 2)


def gaussian_fit(values, n_bins: int = 40, width: float = 3.0, min_entries: int = 20) -> tuple[float, float]:
    """(μ, σ) of a Gaussian fitted to the histogram of ``values`` within ±``width`` robust σ of the median.

    The start values are the median and 1.4826·MAD (robust against the tails that
    mis-reconstructed jets put into Δm). With fewer than ``min_entries`` finite values, a
    degenerate spread or a failed fit, the robust estimates are returned instead.
    """
    from scipy.optimize import curve_fit

    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    mu0 = float(np.median(v))
    s0 = float(1.4826 * np.median(np.abs(v - mu0)))
    if s0 <= 0:
        s0 = float(v.std())
    if len(v) < min_entries or s0 <= 0:
        return mu0, s0
    h, edges = np.histogram(v, bins=n_bins, range=(mu0 - width * s0, mu0 + width * s0))
    c = 0.5 * (edges[1:] + edges[:-1])
    try:
        (a, mu, sigma), _ = curve_fit(_gauss, c, h, p0=(h.max(), mu0, s0), sigma=np.sqrt(np.maximum(h, 1)),
                                      maxfev=2000)
    except (RuntimeError, ValueError):
        return mu0, s0
    sigma = abs(float(sigma))
    if not np.isfinite(sigma) or sigma == 0 or sigma > 10 * s0 or abs(mu - mu0) > width * s0:
        return mu0, s0
    return float(mu), sigma


def observables_of(x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Jet observables (mass and pT in GeV, τ21, τ32, …) of padded scaled features, massless constituents."""
    from ..observables import jet_observables

    return jet_observables(features_to_p4((np.asarray(x), np.asarray(mask, bool))))


def resolution_table(original: dict, reconstructed: dict, labels, observables=RESOLUTION_OBSERVABLES,
                     class_names=CLASS_LABELS) -> dict:
    """Gaussian-fit μ, σ of reconstructed − original, per method, observable and class.

    ``original``: observables dict (arrays (N,)); ``reconstructed``: {method: observables dict of
    the same jets}. Returns ``{method: {observable: {class label (e.g. "Tbqq") or "all": {"mu", "sigma", "n"}}}}``
    (classes without jets are left out).
    """
    labels = np.asarray(labels)
    table = {}
    for method, rec in reconstructed.items():
        table[method] = {}
        for obs in observables:
            delta = np.asarray(rec[obs], np.float64) - np.asarray(original[obs], np.float64)
            if delta.shape != labels.shape:
                raise OmnijetError(f"resolution_table: {method} {obs} has {delta.shape} entries, labels {labels.shape}")
            rows = {}
            for c, name in enumerate(class_names):
                sel = labels == c
                if sel.any():
                    mu, sigma = gaussian_fit(delta[sel])
                    rows[name] = {"mu": mu, "sigma": sigma, "n": int(sel.sum())}
            mu, sigma = gaussian_fit(delta)
            rows["all"] = {"mu": mu, "sigma": sigma, "n": len(delta)}
            table[method][obs] = rows
    return table


# --------------------------------------------------------------------------- codebook
def codebook_usage(tokens, mask, num_codes: int) -> dict:
    """``{"usage": fraction of codes used, "perplexity": exp(entropy), "used": count}`` of real tokens."""
    t = np.asarray(tokens)[np.asarray(mask, bool)].astype(np.int64)
    if len(t) and (t.min() < 0 or t.max() >= num_codes):
        raise OmnijetError(f"codebook_usage: token ids outside 0..{num_codes - 1}")
    counts = np.bincount(t, minlength=num_codes).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "used": int((counts > 0).sum())}


# --------------------------------------------------------------------------- fig 5
def classifier_accuracy(arch: str, x, mask, labels, split, epochs: int, batch_size: int = 256, lr: float = 1e-3,
                        train_config=None, seed: int = 0, model_kw: dict | None = None, extra_test=(),
                        out_dir=None):
    """Train a 10-class classifier on one representation of the jets; ``(model, accuracies)``.

    ``arch``: "deepsets" (paper sizes by default) or "transformer" (5 NormFormer + 2
    class-attention blocks); ``model_kw`` overrides their config fields. ``split`` =
    (train, val, test) index arrays (:func:`~omnijet_lib.training.classifier.split_indices`); the
    epoch with the lowest validation loss is kept (checkpoints in ``out_dir``, a temporary folder
    when None). ``accuracies`` has ``"test"`` and one entry per
    ``extra_test`` item ``(name, x, mask, labels)`` (e.g. a real-data sample).
    """
    import tempfile

    from ..models.deepsets import DeepSets, DeepSetsConfig
    from ..models.normformer import TransformerClassifier, TransformerClassifierConfig
    from ..training.classifier import predict_proba, train_classifier

    archs = {"deepsets": (DeepSets, DeepSetsConfig), "transformer": (TransformerClassifier, TransformerClassifierConfig)}
    if arch not in archs:
        raise OmnijetError(f"classifier arch {arch!r} is unknown, expected one of {sorted(archs)}")
    model_cls, cfg_cls = archs[arch]
    n_classes = max(int(np.max(labels)) + 1, len(CLASS_LABELS))
    try:
        cfg = cfg_cls(n_classes=n_classes, **(model_kw or {}))
    except TypeError as err:
        raise OmnijetError(f"{arch} classifier parameters: {err}") from None
    torch.manual_seed(seed)
    model = model_cls(cfg)
    x, mask, labels = np.asarray(x, np.float32), np.asarray(mask, bool), np.asarray(labels, np.int64)
    tr, va, te = split
    with tempfile.TemporaryDirectory() as tmp:
        model = train_classifier(model, x[tr], mask[tr], labels[tr], val=(x[va], mask[va], labels[va]),
                                 out_dir=out_dir or tmp, epochs=epochs, batch_size=batch_size, lr=lr,
                                 train_config=train_config, seed=seed)
    acc = {}
    for name, xt, mt, yt in [("test", x[te], mask[te], labels[te]), *extra_test]:
        p = predict_proba(model, np.asarray(xt, np.float32), np.asarray(mt, bool))
        acc[name] = float((p.argmax(1) == np.asarray(yt)).mean())
    return model, acc


# --------------------------------------------------------------------------- tokenizers of the study
def tokenizer_dir(models_dir, kind: str, num_codes: int):
    """Where notebooks share a tokenizer: ``{models_dir}/tokenizer_{kind}_{K}``."""
    from pathlib import Path

    return Path(models_dir) / f"tokenizer_{kind}_{int(num_codes)}"


def load_or_train_tokenizer(models_dir, kind: str, num_codes: int, x, mask, epochs: int, batch_size: int = 512,
                            train_config=None, seed: int = 0, model_kw: dict | None = None, progress=print):
    """The tokenizer at ``{models_dir}/tokenizer_{kind}_{K}/tokenizer.safetensors`` if it exists
    (whatever its architecture), else trained on ``x``, ``mask`` and saved there (resumable).

    ``model_kw`` go to the VQ-VAE config (ignored for "binned", whose K must be a cube)."""
    import time

    from ..training.vqvae import train_tokenizer
    from ..tokenizers.base import load_tokenizer

    out = tokenizer_dir(models_dir, kind, num_codes)
    path = out / "tokenizer.safetensors"
    if path.is_file():
        tok = load_tokenizer(path)
        if tok.num_codes != num_codes:
            raise OmnijetError(f"{path}: holds {tok.num_codes} codes, expected {num_codes}")
        progress(f"{kind} K={num_codes}: loaded {path}")
        return tok.cpu().eval()
    t0 = time.perf_counter()
    kw = {} if kind == "binned" else dict(model_kw or {})
    tok = train_tokenizer(kind, x, mask, num_codes, epochs=epochs, batch_size=batch_size, out_dir=out,
                          train_config=train_config, seed=seed, **kw)
    progress(f"{kind} K={num_codes}: trained on {len(x)} jets in {time.perf_counter() - t0:.0f} s -> {path}")
    return tok.cpu().eval()

"""Constituent features fed to the tokenizer, padding, and the way back to 4-vectors.

Features (OmniJet-α): jet axis = 4-vector sum of the constituents;
``log(pT/GeV) - 1.8``, ``3 * eta_rel``, ``3 * phi_rel`` with phi_rel wrapped to (-pi, pi];
constituents with ``|eta_rel| >= 0.8`` or ``|phi_rel| >= 0.8`` are dropped.
All work is done on flat numpy arrays (no Python loop over jets or constituents).
"""

from __future__ import annotations

import logging

import awkward as ak
import numpy as np
import vector

from ..io import OmnijetError

log = logging.getLogger(__name__)

__all__ = [
    "FEATURE_NAMES",
    "MAX_CONSTITUENTS",
    "PT_SHIFT",
    "ANGLE_SCALE",
    "constituent_features",
    "flat_features",
    "pad_into",
    "to_padded",
    "padded_to_jagged",
    "features_to_p4",
]

FEATURE_NAMES = ("log_pt_scaled", "eta_rel_scaled", "phi_rel_scaled")
MAX_CONSTITUENTS = 128
PT_SHIFT = 1.8      # log(pT / GeV) - 1.8
ANGLE_SCALE = 3.0   # 3 * eta_rel, 3 * phi_rel
REL_CUT = 0.8       # |eta_rel|, |phi_rel| < 0.8


def constituent_features(jets: ak.Array) -> ak.Array:
    """Scaled per-constituent features, jagged ``(n_jets, var, 3)`` float32, pT-ordered.

    ``jets`` is the array from :func:`read_jetclass` (or anything with a ``part`` field of
    4-vectors). Columns: :data:`FEATURE_NAMES`.
    """
    part = jets.part if "part" in ak.fields(jets) else jets
    counts = ak.to_numpy(ak.num(part, axis=1))
    px, py, pz = (ak.to_numpy(ak.flatten(c)).astype(np.float32, copy=False) for c in (part.px, part.py, part.pz))
    feats, new_counts = flat_features(px, py, pz, counts)
    return ak.unflatten(feats, new_counts)


def flat_features(px: np.ndarray, py: np.ndarray, pz: np.ndarray,
                  counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`constituent_features` on flat constituent arrays (GeV; ``counts`` per jet):
    ``(features (M, 3) float32, kept constituents per jet (N,))``. The energy is not needed:
    the axis direction and the relative angles use the 3-momenta only."""
    n = len(counts)
    jet_idx = np.repeat(np.arange(n), counts)
    # jet axis = 4-vector sum (accumulated in float64); empty jets get a dummy axis
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    nonempty = counts > 0
    jpx, jpy, jpz = (np.zeros(n) for _ in range(3))
    for out, c in ((jpx, px), (jpy, py), (jpz, pz)):
        if nonempty.any():
            out[nonempty] = np.add.reduceat(c, starts[nonempty], dtype=np.float64)
    jet_eta = np.arcsinh(jpz / np.maximum(np.hypot(jpx, jpy), 1e-12)).astype(np.float32)
    jet_phi = np.arctan2(jpy, jpx)
    cos_j, sin_j = np.cos(jet_phi).astype(np.float32), np.sin(jet_phi).astype(np.float32)
    pt = np.hypot(px, py)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta_rel = np.arcsinh(pz / pt) - jet_eta[jet_idx]
    # rotating into the jet frame wraps phi_rel into (-pi, pi] for free
    cj, sj = cos_j[jet_idx], sin_j[jet_idx]
    phi_rel = np.arctan2(py * cj - px * sj, px * cj + py * sj)
    keep = (np.abs(eta_rel) < REL_CUT) & (np.abs(phi_rel) < REL_CUT) & (pt > 0)
    feats = np.empty((int(keep.sum()), 3), np.float32)
    feats[:, 0] = np.log(pt[keep]) - PT_SHIFT
    feats[:, 1] = ANGLE_SCALE * eta_rel[keep]
    feats[:, 2] = ANGLE_SCALE * phi_rel[keep]
    kept_jet = jet_idx[keep]
    new_counts = np.bincount(kept_jet, minlength=n)
    # pT order inside each jet (JetClass files already are; only re-sort when needed)
    if np.any((np.diff(kept_jet) == 0) & (np.diff(feats[:, 0]) > 0)):
        feats = feats[np.lexsort((-feats[:, 0], kept_jet))]
    return feats, new_counts


def to_padded(features: ak.Array, max_len: int = MAX_CONSTITUENTS) -> tuple[np.ndarray, np.ndarray]:
    """Pad/clip jagged features to ``(N, max_len, 3)`` float32 plus a bool mask ``(N, max_len)``.

    Jets with more than ``max_len`` constituents keep the ``max_len`` hardest (input is pT
    ordered); the number of clipped jets is logged.
    """
    if max_len <= 0:
        raise OmnijetError(f"max_len must be positive, got {max_len}")
    counts = ak.to_numpy(ak.num(features, axis=1))
    x = np.zeros((len(counts), max_len, 3), np.float32)
    mask = np.zeros((len(counts), max_len), bool)
    pad_into(x, mask, ak.to_numpy(ak.flatten(features, axis=1)).reshape(-1, 3), counts)
    return x, mask


def pad_into(x: np.ndarray, mask: np.ndarray, flat: np.ndarray, counts: np.ndarray) -> None:
    """Write flat per-jet rows (``counts`` each, pT-ordered) into zeroed ``x (N, L, F)`` and
    ``mask (N, L)``; jets with more than ``L`` rows keep their first ``L`` (logged)."""
    max_len = mask.shape[1]
    clipped = counts > max_len
    if clipped.any():
        log.info("clipped %d jets with more than %d constituents to the %d hardest",
                 int(clipped.sum()), max_len, max_len)
        pos = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
        flat = flat[pos < max_len]
    mask[:] = np.arange(max_len) < counts[:, None]  # (N, L): real rows first, in order
    x[mask] = flat  # row-major order of the mask = jet by jet, constituent by constituent


def padded_to_jagged(x: np.ndarray, mask: np.ndarray) -> ak.Array:
    """Inverse of :func:`to_padded`: jagged ``(N, var, 3)`` from padded features and mask."""
    x = np.asarray(x)
    mask = np.asarray(mask, bool)
    return ak.unflatten(x[mask], mask.sum(axis=1))


def features_to_p4(
    features: ak.Array | tuple[np.ndarray, np.ndarray],
    jet_eta: np.ndarray | float = 0.0,
    jet_phi: np.ndarray | float = 0.0,
) -> ak.Array:
    """Massless constituent 4-vectors (GeV) from scaled features, jagged Momentum4D.

    Accepts jagged features or a ``(x, mask)`` padded pair. The jet axis defaults to
    (eta, phi) = (0, 0): mass, pT and N-subjettiness do not depend on it.
    """
    if isinstance(features, tuple):
        features = padded_to_jagged(*features)
    counts = ak.to_numpy(ak.num(features, axis=1))
    flat = ak.to_numpy(ak.flatten(features, axis=1)).reshape(-1, 3).astype(np.float64)
    if not np.isfinite(flat).all():
        raise OmnijetError("features contain NaN/inf values")
    n = len(counts)
    jet_eta = np.broadcast_to(np.asarray(jet_eta, np.float64), (n,))
    jet_phi = np.broadcast_to(np.asarray(jet_phi, np.float64), (n,))
    idx = np.repeat(np.arange(n), counts)
    pt = np.exp(flat[:, 0] + PT_SHIFT)
    eta = flat[:, 1] / ANGLE_SCALE + jet_eta[idx]
    phi = flat[:, 2] / ANGLE_SCALE + jet_phi[idx]
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    e = pt * np.cosh(eta)
    cols = {k: ak.unflatten(v.astype(np.float32), counts) for k, v in zip(("px", "py", "pz", "E"), (px, py, pz, e))}
    return vector.zip(cols)

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
    "to_padded",
    "padded_to_jagged",
    "features_to_p4",
]

FEATURE_NAMES = ("log_pt_scaled", "eta_rel_scaled", "phi_rel_scaled")
MAX_CONSTITUENTS = 128
PT_SHIFT = 1.8      # log(pT / GeV) - 1.8
ANGLE_SCALE = 3.0   # 3 * eta_rel, 3 * phi_rel
REL_CUT = 0.8       # |eta_rel|, |phi_rel| < 0.8


def _flat(part: ak.Array) -> tuple[np.ndarray, ...]:
    counts = ak.to_numpy(ak.num(part, axis=1))
    cols = [ak.to_numpy(ak.flatten(getattr(part, c))).astype(np.float64) for c in ("px", "py", "pz")]
    return counts, *cols


def constituent_features(jets: ak.Array) -> ak.Array:
    """Scaled per-constituent features, jagged ``(n_jets, var, 3)`` float32, pT-ordered.

    ``jets`` is the array from :func:`read_jetclass` (or anything with a ``part`` field of
    4-vectors). Columns: :data:`FEATURE_NAMES`.
    """
    part = jets.part if "part" in ak.fields(jets) else jets
    counts, px, py, pz = _flat(part)
    n = len(counts)
    jet_idx = np.repeat(np.arange(n), counts)
    e = ak.to_numpy(ak.flatten(part.E if "E" in ak.fields(part) else part.energy)).astype(np.float64)
    jpx, jpy, jpz, je = (np.bincount(jet_idx, w, minlength=n) for w in (px, py, pz, e))
    pt = np.hypot(px, py)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.arcsinh(pz / pt)
        jet_eta = np.arcsinh(jpz / np.hypot(jpx, jpy))
    phi = np.arctan2(py, px)
    jet_phi = np.arctan2(jpy, jpx)
    eta_rel = eta - jet_eta[jet_idx]
    phi_rel = np.mod(phi - jet_phi[jet_idx] + np.pi, 2 * np.pi) - np.pi
    keep = (np.abs(eta_rel) < REL_CUT) & (np.abs(phi_rel) < REL_CUT) & (pt > 0)
    feats = np.stack(
        [np.log(np.where(keep, pt, 1.0)) - PT_SHIFT, ANGLE_SCALE * eta_rel, ANGLE_SCALE * phi_rel], axis=1
    )[keep].astype(np.float32)
    new_counts = np.bincount(jet_idx[keep], minlength=n)
    kept_pt = pt[keep]
    # pT order inside each jet (JetClass files already are; only re-sort when needed)
    same_jet = np.diff(jet_idx[keep]) == 0
    if np.any(same_jet & (np.diff(kept_pt) > 0)):
        order = np.lexsort((-kept_pt, jet_idx[keep]))
        feats = feats[order]
    return ak.unflatten(feats, new_counts)


def to_padded(features: ak.Array, max_len: int = MAX_CONSTITUENTS) -> tuple[np.ndarray, np.ndarray]:
    """Pad/clip jagged features to ``(N, max_len, 3)`` float32 plus a bool mask ``(N, max_len)``.

    Jets with more than ``max_len`` constituents keep the ``max_len`` hardest (input is pT
    ordered); the number of clipped jets is logged.
    """
    if max_len <= 0:
        raise OmnijetError(f"max_len must be positive, got {max_len}")
    counts = ak.to_numpy(ak.num(features, axis=1))
    flat = ak.to_numpy(ak.flatten(features, axis=1)).reshape(-1, 3)
    n = len(counts)
    clipped = int((counts > max_len).sum())
    if clipped:
        log.info("clipped %d jets with more than %d constituents to the %d hardest", clipped, max_len, max_len)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pos = np.arange(len(flat)) - np.repeat(starts, counts)
    keep = pos < max_len
    jet_idx = np.repeat(np.arange(n), counts)[keep]
    x = np.zeros((n, max_len, 3), np.float32)
    mask = np.zeros((n, max_len), bool)
    x[jet_idx, pos[keep]] = flat[keep]
    mask[jet_idx, pos[keep]] = True
    return x, mask


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

"""The field's generative metrics: W1M, W1P, W1EFP, FPD and KPD (plain numpy/scipy functions).

These follow the definitions of the JetNet library (``jetnet.evaluation``, Kansal et al.,
arXiv 2106.11535 and 2211.10295), re-implemented here because ``jetnet`` 0.2.5 pulls in
``coffea`` (and with it ``pyarrow``, whose current releases refuse numpy < 2; the import fails
in this environment). Only ``energyflow`` (EFPs) and ``scipy`` are needed.

Conventions shared with JetNet, so numbers are comparable:

* W1 scores draw ``n_batches`` batches of ``batch_size`` jets *with replacement* from each sample
  and return the mean and the standard deviation over batches.
* EFPs: ``energyflow.EFPSet`` with the hadronic measure, β = 1, ``normed=None``, massless
  constituents in (pT, y, φ). W1EFP uses the 5 prime EFPs with n = 4, d = 4; FPD and KPD use
  all 36 EFPs with d ≤ 4. Constituent pT enters relative to the jet pT (the JetNet datasets
  store relative pT), so the EFPs are dimensionless and of order one.
* FPD and KPD first divide every feature by its maximum |value| in the *real* sample.
  FPD is the Fréchet distance extrapolated to infinite sample size: it is measured at
  ``n_points`` sample sizes evenly spaced in 1/N between ``min_samples`` and ``max_samples``
  (``n_batches`` draws each), a straight line in 1/N is fitted (intercept ≥ 0, slope ≥ 0) and the
  intercept is returned with its fit uncertainty. The Fréchet distance of a finite sample is
  biased upwards by O(1/N); the intercept removes that bias.
  KPD is the unbiased quadratic-time estimate of the squared MMD with the polynomial kernel
  k(x, y) = (x·y / d + 1)^4, per batch; returned are the median over batches and half the
  16–84 percentile range.
With the same ``seed`` the FPD/KPD resampling draws the same indices as ``jetnet`` does, so the
numbers agree with the library (checked in ``tests/test_metrics.py``).
"""

from __future__ import annotations

import awkward as ak
import numpy as np
from scipy import linalg
from scipy.optimize import curve_fit
from scipy.stats import wasserstein_distance

from .data.features import ANGLE_SCALE, PT_SHIFT
from .io import OmnijetError

__all__ = [
    "w1", "w1m", "w1p", "efps", "w1efp", "frechet_distance", "fpd", "mmd_poly_unbiased", "kpd",
    "W1EFP_SET", "FPD_EFP_SET", "jet_mass", "roc_auc", "summary_metrics", "mass_peaks", "jet_shape_summary",
]

#: EFPs for W1EFP (JetNet default): prime EFPs with 4 vertices and 4 edges (5 polynomials).
W1EFP_SET = (("n==", 4), ("d==", 4), ("p==", 1))
#: EFPs for FPD/KPD (JetNet's recommendation): every EFP with at most 4 edges (36 polynomials).
FPD_EFP_SET = (("d<=", 4),)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _as_2d(name: str, a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or len(a) == 0:
        raise OmnijetError(f"{name}: expected a non-empty (n_samples, n_features) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise OmnijetError(f"{name}: contains NaN/inf values")
    return a


# --------------------------------------------------------------------------- Wasserstein-1
def w1(a, b) -> float:
    """Wasserstein-1 distance between two 1-d samples (same units as the inputs)."""
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    if len(a) == 0 or len(b) == 0:
        raise OmnijetError(f"w1: empty sample (sizes {len(a)} and {len(b)})")
    return float(wasserstein_distance(a, b))


def _batches(n_a: int, n_b: int, n_batches: int, batch_size: int | None, seed):
    """Index pairs of ``n_batches`` batches drawn with replacement (JetNet's resampling)."""
    if n_batches < 1:
        raise OmnijetError(f"n_batches must be >= 1, got {n_batches}")
    size = batch_size or min(n_a, n_b, 50_000)
    rng = _rng(seed)
    for _ in range(n_batches):
        yield rng.choice(n_a, size=size), rng.choice(n_b, size=size)


def w1m(mass_a, mass_b, n_batches: int = 5, batch_size: int | None = None, seed=0) -> tuple[float, float]:
    """W1 of the jet mass (GeV in, GeV out): (mean, std) over resampled batches.

    ``batch_size`` defaults to min(len(a), len(b), 50 000) jets.
    """
    a, b = np.asarray(mass_a, np.float64).ravel(), np.asarray(mass_b, np.float64).ravel()
    vals = [w1(a[i], b[j]) for i, j in _batches(len(a), len(b), n_batches, batch_size, seed)]
    return float(np.mean(vals)), float(np.std(vals))


def w1p(x_a, mask_a, x_b, mask_b, n_batches: int = 5, batch_size: int | None = None,
        seed=0) -> tuple[np.ndarray, np.ndarray]:
    """W1 per constituent feature: padded ``(N, L, F)`` features with ``(N, L)`` masks.

    Each batch draws jets and compares all their real constituents. Returns (means (F,), stds (F,)).
    """
    x_a, x_b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
    m_a, m_b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    if x_a.ndim != 3 or x_a.shape[:2] != m_a.shape or x_b.ndim != 3 or x_b.shape[:2] != m_b.shape:
        raise OmnijetError(f"w1p: expected (N, L, F) features with (N, L) masks, got {x_a.shape}/{m_a.shape} "
                           f"and {x_b.shape}/{m_b.shape}")
    vals = []
    for i, j in _batches(len(x_a), len(x_b), n_batches, batch_size, seed):
        pa, pb = x_a[i][m_a[i]], x_b[j][m_b[j]]  # (n_constituents, F)
        vals.append([w1(pa[:, f], pb[:, f]) for f in range(x_a.shape[2])])
    return np.mean(vals, axis=0), np.std(vals, axis=0)


# --------------------------------------------------------------------------- EFPs
def _jets_to_ptyphi(jets, mask=None) -> list[np.ndarray]:
    """Per-jet (n_i, 3) arrays of (pT, y, φ) with y, φ relative to the jet axis (massless).

    ``jets``: padded scaled features (N, L, 3) (``omnijet_lib.data.features``) with ``mask``,
    a ``(x, mask)`` tuple, or jagged Momentum4D constituents (an awkward array, or a record
    array with a ``part`` field).
    """
    if isinstance(jets, tuple):
        jets, mask = jets
    if isinstance(jets, ak.Array):
        part = jets.part if "part" in ak.fields(jets) else jets
        counts = ak.to_numpy(ak.num(part, axis=1))
        px, py, pz = (ak.to_numpy(ak.flatten(getattr(part, c))).astype(np.float64) for c in ("px", "py", "pz"))
        idx = np.repeat(np.arange(len(counts)), counts)
        jpx, jpy, jpz = (np.bincount(idx, w, minlength=len(counts)) for w in (px, py, pz))
        pt = np.hypot(px, py)
        with np.errstate(divide="ignore", invalid="ignore"):
            eta = np.arcsinh(pz / pt) - np.arcsinh(jpz / np.hypot(jpx, jpy))[idx]
        phi = np.mod(np.arctan2(py, px) - np.arctan2(jpy, jpx)[idx] + np.pi, 2 * np.pi) - np.pi
        flat = np.stack([pt, eta, phi], 1)
    else:
        x = np.asarray(jets, np.float64)
        if mask is None:
            raise OmnijetError("efps: padded features need a mask")
        mask = np.asarray(mask, bool)
        if x.ndim != 3 or x.shape[:2] != mask.shape or x.shape[2] < 3:
            raise OmnijetError(f"efps: expected (N, L, 3) features with an (N, L) mask, got {x.shape}/{mask.shape}")
        counts = mask.sum(1)
        f = x[mask]
        flat = np.stack([np.exp(f[:, 0] + PT_SHIFT), f[:, 1] / ANGLE_SCALE, f[:, 2] / ANGLE_SCALE], 1)
    if not np.isfinite(flat).all():
        raise OmnijetError("efps: constituents contain NaN/inf values")
    return np.split(flat, np.cumsum(counts)[:-1])


def efps(jets, mask=None, efpset=FPD_EFP_SET, pt_rel: bool = True, n_jobs: int = 1) -> np.ndarray:
    """Energy-flow polynomials per jet, ``(N, n_efps)`` float64, via ``energyflow``.

    ``jets`` as in :func:`_jets_to_ptyphi` (padded scaled features + mask, or Momentum4D).
    ``pt_rel`` divides constituent pT by the jet pT (vector sum), as in the JetNet datasets.
    ``efpset``: EFPSet selection, :data:`FPD_EFP_SET` (36, for FPD/KPD) or :data:`W1EFP_SET` (5).
    Costs ~1 ms per jet of 40 constituents per process; only real constituents are passed.
    """
    import energyflow as ef

    events = _jets_to_ptyphi(jets, mask)
    if pt_rel:
        for ev in events:
            if len(ev):
                c, s = np.cos(ev[:, 2]), np.sin(ev[:, 2])
                ev[:, 0] /= max(np.hypot((ev[:, 0] * c).sum(), (ev[:, 0] * s).sum()), 1e-12)
    s = ef.EFPSet(*efpset, measure="hadr", beta=1, normed=None, coords="ptyphim")
    if not events:
        return np.zeros((0, len(s.efps)))
    return np.asarray(s.batch_compute(events, n_jobs=n_jobs), np.float64).reshape(len(events), -1)


def w1efp(efps_a, efps_b, n_batches: int = 5, batch_size: int | None = None,
          seed=0) -> tuple[np.ndarray, np.ndarray]:
    """W1 per EFP column of two ``(N, n_efps)`` arrays (from :func:`efps` with :data:`W1EFP_SET`).

    Returns (means, stds) per EFP; the usual single W1EFP number is ``means.mean()``.
    """
    a, b = _as_2d("w1efp efps_a", efps_a), _as_2d("w1efp efps_b", efps_b)
    if a.shape[1] != b.shape[1]:
        raise OmnijetError(f"w1efp: different numbers of EFPs ({a.shape[1]} and {b.shape[1]})")
    vals = [[w1(a[i, k], b[j, k]) for k in range(a.shape[1])]
            for i, j in _batches(len(a), len(b), n_batches, batch_size, seed)]
    return np.mean(vals, axis=0), np.std(vals, axis=0)


# --------------------------------------------------------------------------- FPD / KPD
def _normalise(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(real).max(0)
    scale[scale == 0] = 1.0  # constant-zero features stay as they are
    return real / scale, gen / scale


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance of two Gaussians: |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

    The trace of (Σ1 Σ2)^½ is computed as Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½
    (same eigenvalues), which stays real and stable for near-singular covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
    w, v = linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ1^½
    lam = linalg.eigvalsh(root1 @ cov2 @ root1)
    tr_sqrt = np.sqrt(np.clip(lam, 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def fpd(real_features, gen_features, min_samples: int = 20_000, max_samples: int = 50_000,
        n_batches: int = 20, n_points: int = 10, normalise: bool = True, seed: int = 42) -> tuple[float, float]:
    """Fréchet physics distance extrapolated to infinite sample size: (value, error).

    Sample sizes above the smaller input are capped to it (with a smaller range of 1/N the
    extrapolation is less certain, which shows in the error).
    """
    X, Y = _as_2d("fpd real_features", real_features), _as_2d("fpd gen_features", gen_features)
    if X.shape[1] != Y.shape[1]:
        raise OmnijetError(f"fpd: different numbers of features ({X.shape[1]} and {Y.shape[1]})")
    if X.shape[1] < 1 or min(len(X), len(Y)) < 3:
        raise OmnijetError("fpd: need at least 3 samples on each side")
    if normalise:
        X, Y = _normalise(X, Y)
    cap = min(len(X), len(Y))
    hi = min(max_samples, cap)
    lo = min(min_samples, hi)
    if lo == hi:
        lo = max(2, hi // 2)  # keep a lever arm in 1/N
    sizes = (1 / np.linspace(1.0 / lo, 1.0 / hi, n_points)).astype(np.int32)
    rng = np.random.default_rng(seed)
    means = []
    for n in sizes:
        vals = []
        for _ in range(n_batches):
            a, b = X[rng.choice(len(X), size=n)], Y[rng.choice(len(Y), size=n)]
            vals.append(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
        means.append(np.mean(vals))
    line = lambda x, c, m: c + m * x  # noqa: E731
    params, cov = curve_fit(line, 1.0 / sizes, means, bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(cov[0, 0]))


def mmd_poly_unbiased(X: np.ndarray, Y: np.ndarray, degree: int = 4) -> float:
    """Unbiased squared MMD with the kernel (x·y / d + 1)^degree (diagonal terms excluded)."""
    gamma = 1.0 / X.shape[1]
    kxx = (X @ X.T * gamma + 1.0) ** degree
    kyy = (Y @ Y.T * gamma + 1.0) ** degree
    kxy = (X @ Y.T * gamma + 1.0) ** degree
    m, n = len(X), len(Y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kpd(real_features, gen_features, n_batches: int = 10, batch_size: int = 5_000, normalise: bool = True,
        seed: int = 42, degree: int = 4) -> tuple[float, float]:
    """Kernel physics distance: (median, half the 16–84 % range) of the unbiased squared MMD
    over ``n_batches`` batches of ``batch_size`` draws (with replacement) from each sample.
    Identical samples give values scattered around 0 (it can be slightly negative)."""
    X, Y = _as_2d("kpd real_features", real_features), _as_2d("kpd gen_features", gen_features)
    if X.shape[1] != Y.shape[1]:
        raise OmnijetError(f"kpd: different numbers of features ({X.shape[1]} and {Y.shape[1]})")
    if batch_size < 2:
        raise OmnijetError(f"kpd: batch_size must be >= 2, got {batch_size}")
    if normalise:
        X, Y = _normalise(X, Y)
    vals = []
    for i in range(n_batches):
        rng = np.random.default_rng(seed + i * 1000)  # per-batch stream, as in jetnet
        a, b = X[rng.choice(len(X), size=batch_size)], Y[rng.choice(len(Y), size=batch_size)]
        vals.append(mmd_poly_unbiased(a, b, degree))
    lo, hi = np.percentile(vals, [16.275, 83.725])
    return float(np.median(vals)), float((hi - lo) / 2)


# --------------------------------------------------------------------------- all at once
def jet_mass(x, mask) -> np.ndarray:
    """Jet mass [GeV] of padded scaled features (massless constituents)."""
    from .data.features import features_to_p4
    from .observables import jet_mass as mass_of

    return mass_of(features_to_p4((np.asarray(x), np.asarray(mask, bool))))


def mass_peaks(mass, windows=((0.0, 120.0), (130.0, 230.0)), bin_width: float = 10.0) -> dict:
    """Does a jet-mass distribution [GeV] have a peak in each of two windows (q/g, top)?

    Histograms ``mass`` in ``bin_width`` bins and takes the fullest bin of each window; the dip is
    the emptiest bin between the two. A peak counts when it stands out of the dip by at least three
    standard deviations of the counts, (peak − dip) / sqrt(peak + dip) ≥ 3. Returns the peak and dip
    positions (bin centres, GeV), counts, significances and ``both_peaks``.
    """
    mass = np.asarray(mass, dtype=float)
    (lo, hi), (lo2, hi2) = windows
    if not lo < hi <= lo2 < hi2:
        raise OmnijetError(f"mass_peaks: windows must be ordered and disjoint, got {windows}")
    edges = np.arange(lo, hi2 + bin_width / 2, bin_width)
    counts, _ = np.histogram(mass, edges)
    centres = (edges[:-1] + edges[1:]) / 2
    first = np.flatnonzero(centres < hi)
    second = np.flatnonzero(centres > lo2)
    i, j = first[np.argmax(counts[first])], second[np.argmax(counts[second])]
    between = counts[i + 1:j]
    dip = int(between.min()) if len(between) else int(min(counts[i], counts[j]))
    k = i + 1 + int(np.argmin(between)) if len(between) else (i if counts[i] <= counts[j] else j)

    def significance(peak):
        return float((peak - dip) / np.sqrt(peak + dip)) if peak + dip > 0 else 0.0

    sig = [significance(int(counts[i])), significance(int(counts[j]))]
    return {"qg_peak_gev": float(centres[i]), "top_peak_gev": float(centres[j]), "dip_gev": float(centres[k]),
            "counts": [int(counts[i]), dip, int(counts[j])], "significance": sig,
            "both_peaks": bool(len(between) > 0 and min(sig) >= 3)}


def jet_shape_summary(mass, tau32) -> dict:
    """Median jet mass [GeV] and τ32 of a sample (jets without τ32, e.g. < 3 constituents, are
    skipped) and its :func:`mass_peaks`: the numbers the quick profile's targets are stated in."""
    return {"median_mass": float(np.median(np.asarray(mass, float))),
            "median_tau32": float(np.nanmedian(np.asarray(tau32, float))), "mass_peaks": mass_peaks(mass)}


# --------------------------------------------------------------------------- classifiers
def roc_auc(labels, scores) -> float:
    """Area under the ROC curve for binary ``labels`` (1 = positive) and ``scores``
    (the Mann-Whitney U statistic; ties count one half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise OmnijetError(f"roc_auc needs both classes, got {n_pos} positive and {n_neg} negative")
    ranks = rankdata(np.asarray(scores, dtype=float))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """``(background efficiency, signal efficiency)`` of a cut ``score > t`` over every threshold,
    from (0, 0) to (1, 1), for binary ``labels`` (1 = signal); tied scores move both at once."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, float)
    if labels.all() or not labels.any():
        raise OmnijetError(f"roc_curve needs both classes, got {int(labels.sum())} signal and {int((~labels).sum())} background")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last jet of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fp / fp[-1]], np.r_[0, tp / tp[-1]]


def summary_metrics(real_x, real_mask, gen_x, gen_mask, n_batches: int = 5, batch_size: int | None = None,
                    seed: int = 0, n_jobs: int = 1) -> dict:
    """Every metric for two samples of padded scaled features, as a flat dict of floats.

    Keys: ``w1m``/``w1m_std`` (GeV), ``w1p_<feature>``/``..._std`` (scaled-feature units),
    ``w1efp``/``w1efp_std`` (mean over the 5 EFPs; std combined in quadrature / 5),
    ``fpd``/``fpd_err`` and ``kpd``/``kpd_err`` on the 36 EFPs. FPD sample sizes and the KPD
    batch are capped to the smaller sample (the defaults assume 50 000 jets).
    """
    from .data.features import FEATURE_NAMES

    n = min(len(real_x), len(gen_x))
    out = {}
    out["w1m"], out["w1m_std"] = w1m(jet_mass(real_x, real_mask), jet_mass(gen_x, gen_mask), n_batches, batch_size, seed)
    means, stds = w1p(real_x, real_mask, gen_x, gen_mask, n_batches, batch_size, seed)
    for name, m, s in zip(FEATURE_NAMES, means, stds):
        out[f"w1p_{name}"], out[f"w1p_{name}_std"] = float(m), float(s)
    ea = efps(real_x, real_mask, efpset=W1EFP_SET, n_jobs=n_jobs)
    eb = efps(gen_x, gen_mask, efpset=W1EFP_SET, n_jobs=n_jobs)
    means, stds = w1efp(ea, eb, n_batches, batch_size, seed)
    out["w1efp"], out["w1efp_std"] = float(means.mean()), float(np.sqrt((stds ** 2).sum()) / len(stds))
    fa = efps(real_x, real_mask, efpset=FPD_EFP_SET, n_jobs=n_jobs)
    fb = efps(gen_x, gen_mask, efpset=FPD_EFP_SET, n_jobs=n_jobs)
    out["fpd"], out["fpd_err"] = fpd(fa, fb, min_samples=min(20_000, max(n // 2, 2)), max_samples=min(50_000, n),
                                     seed=42 + seed)
    out["kpd"], out["kpd_err"] = kpd(fa, fb, batch_size=min(5_000, n), seed=42 + seed)
    return out

"""Generative metrics on cases with known answers, and against jetnet 0.2.5's own numbers.

The ``JETNET_*`` reference values were produced with ``jetnet==0.2.5`` (``jetnet.evaluation.fpd``,
``kpd`` and ``jetnet.utils.efps``; energyflow 1.4.0, numpy 1.26.4) in a throw-away virtualenv
outside the repository (jetnet needs coffea → pyarrow, installed there with ``pyarrow<16``),
on exactly the inputs built below. They are hard-coded so the tests need no jetnet.
"""

import numpy as np
import pytest

from omnijet_lib.io import OmnijetError
from omnijet_lib.metrics import (
    FPD_EFP_SET, W1EFP_SET, efps, fpd, frechet_distance, jet_shape_summary, kpd, mass_peaks, w1, w1efp, w1m, w1p,
)


def gaussian_pair():
    rng = np.random.default_rng(123)
    X = rng.normal(size=(3000, 4)) * [1, 2, 0.5, 1]
    Y = rng.normal(size=(3000, 4)) * [1, 2, 0.5, 1] + [0.3, 0, 0, 0.1]
    return X, Y


def small_jets():
    """Three jets in jetnet's [eta, phi, pt] layout and the same jets as our scaled features."""
    rng = np.random.default_rng(5)
    jets = np.zeros((3, 12, 3))
    for i, k in enumerate([3, 7, 12]):
        pt = np.sort(rng.exponential(20, k))[::-1] + 1
        jets[i, :k] = np.c_[rng.normal(0, 0.2, k), rng.normal(0, 0.2, k), pt]
    mask = jets[..., 2] > 0
    x = np.stack([np.log(np.where(mask, jets[..., 2], 1)) - 1.8, 3 * jets[..., 0], 3 * jets[..., 1]], -1)
    return x, mask


# jetnet.evaluation.fpd(X, Y, min_samples=500, max_samples=2000, num_batches=5, num_points=4, seed=42)
JETNET_FPD = (0.0046410004265773075, 0.0006355230444033783)
# jetnet.evaluation.kpd(X, Y, num_batches=6, batch_size=400, seed=42) and kpd(X, X, ..., seed=7)
JETNET_KPD = (0.006549243806130978, 0.0019810596057627727)
JETNET_KPD_SAME = (-0.0005227102284566243, 0.0010101325803756021)
# jetnet.utils.efps(jets, efpset_args=[("d<=", 4)])[:, [1, 5, 20, 35]] (absolute pT)
JETNET_EFP36 = np.array([
    [9.9943597811761049e+02, 1.3727813405599722e+04, 2.3150097055832585e+06, 9.9774582047693787e+11],
    [8.5901321567599134e+03, 3.9683258957631665e+05, 8.4242573997030032e+08, 5.4450187741885030e+15],
    [1.2304866497442339e+04, 7.6361457972916216e+05, 2.8851789619446578e+09, 2.2924909221477576e+16],
])
# jetnet.utils.efps(jets) with its default W1EFP set (n==4, d==4, p==1)
JETNET_EFP5 = np.array([
    [63146.53758091068, 46817.184573144186, 50881.14752366906, 21603.297028005683, 34068.92560107669],
    [6544360.81676688, 6279350.387414597, 6437933.792350607, 3724525.782974716, 4932248.687664766],
    [20594076.446239624, 18205184.920486275, 19198263.95129183, 14232424.012762472, 14536489.957646534],
])


def test_fpd_kpd_match_jetnet():
    X, Y = gaussian_pair()
    assert fpd(X, Y, min_samples=500, max_samples=2000, n_batches=5, n_points=4, seed=42) == \
        pytest.approx(JETNET_FPD, rel=1e-6)
    assert kpd(X, Y, n_batches=6, batch_size=400, seed=42) == pytest.approx(JETNET_KPD, rel=1e-9)
    assert kpd(X, X, n_batches=6, batch_size=400, seed=7) == pytest.approx(JETNET_KPD_SAME, rel=1e-9)


def test_efps_match_jetnet():
    x, mask = small_jets()
    e36 = efps(x, mask, efpset=FPD_EFP_SET, pt_rel=False)
    assert e36.shape == (3, 36)
    np.testing.assert_allclose(e36[:, [1, 5, 20, 35]], JETNET_EFP36, rtol=1e-9)
    e5 = efps((x, mask), efpset=W1EFP_SET, pt_rel=False)
    np.testing.assert_allclose(e5, JETNET_EFP5, rtol=1e-9)


def test_efps_relative_pt_and_p4_input():
    import awkward as ak

    from omnijet_lib.data.features import features_to_p4

    x, mask = small_jets()
    rel = efps(x, mask, efpset=W1EFP_SET)
    # relative pT makes EFPs (degree-n homogeneous in pT) scale-free: EFP_rel = EFP_abs / pT_jet^4
    p4 = features_to_p4((x, mask))
    jet_pt = ak.to_numpy(ak.sum(p4, axis=1).pt).astype(np.float64)
    np.testing.assert_allclose(rel, JETNET_EFP5 / jet_pt[:, None] ** 4, rtol=1e-4)
    # Momentum4D constituents (axis recomputed, massless) give the same as the features
    np.testing.assert_allclose(efps(p4, efpset=W1EFP_SET), rel, rtol=1e-4)
    # boosting the jet axis does not change them
    moved = features_to_p4((x, mask), jet_eta=1.3, jet_phi=3.0)
    np.testing.assert_allclose(efps(moved, efpset=W1EFP_SET), rel, rtol=1e-3)


def test_frechet_distance_of_gaussians():
    # closed form: |mu1-mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)); diagonal case: sum (s1 - s2)^2
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + (1 - 2) ** 2 + (2 - 3) ** 2)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    s = a @ a.T
    assert frechet_distance(mu1.repeat(3)[:5], s, mu1.repeat(3)[:5], s) == pytest.approx(0, abs=1e-8)
    # non-commuting covariances against scipy.linalg.sqrtm
    from scipy import linalg

    b = rng.normal(size=(5, 5))
    t = b @ b.T + np.eye(5)
    expect = np.trace(s + t - 2 * linalg.sqrtm(s @ t).real)
    assert frechet_distance(np.zeros(5), s, np.zeros(5), t) == pytest.approx(expect, rel=1e-6)


def test_fpd_extrapolation_removes_finite_size_bias():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(20000, 3)), rng.normal(size=(20000, 3))
    val, err = fpd(X, Y, min_samples=1000, max_samples=5000, n_batches=5, n_points=5)
    assert val < 5e-4 and err < 1e-3  # same distribution: ~0 at N = inf
    shifted, _ = fpd(X, Y + [1.0, 0, 0], min_samples=1000, max_samples=5000, n_batches=5, n_points=5,
                     normalise=False)
    assert shifted == pytest.approx(1.0, abs=0.05)  # |Δμ|² = 1
    with pytest.raises(OmnijetError, match="features"):
        fpd(X, Y[:, :2])


def test_kpd_known_cases():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(4000, 3))
    same, err = kpd(X, rng.normal(size=(4000, 3)), n_batches=8, batch_size=500)
    assert abs(same) < 3 * err + 1e-3
    diff, err2 = kpd(X, rng.normal(size=(4000, 3)) + 0.5, n_batches=8, batch_size=500)
    assert diff > 3 * err2 and diff > 10 * abs(same)
    with pytest.raises(OmnijetError, match="NaN"):
        kpd(X, np.full((10, 3), np.nan))


def test_w1_family():
    rng = np.random.default_rng(3)
    a = rng.normal(size=20000)
    assert w1(a, a + 2.5) == pytest.approx(2.5)
    mean, std = w1m(a * 10 + 100, a * 10 + 103, n_batches=4, batch_size=5000, seed=1)
    assert mean == pytest.approx(3.0, abs=0.4) and 0 < std < 0.5
    m0, _ = w1m(a, a, n_batches=5)
    assert m0 < 0.05
    # per feature: shift only the second one, padding values must not count
    xa = rng.normal(size=(500, 10, 3))
    xb = rng.normal(size=(500, 10, 3)) + [0.0, 1.0, 0.0]
    ma = np.arange(10)[None] < rng.integers(1, 11, 500)[:, None]
    mb = np.arange(10)[None] < rng.integers(1, 11, 500)[:, None]
    xa[~ma] = 1e6
    means, stds = w1p(xa, ma, xb, mb, n_batches=3, seed=0)
    assert means.shape == stds.shape == (3,)
    assert means[1] == pytest.approx(1.0, abs=0.15) and means[0] < 0.15 and means[2] < 0.15
    ea, eb = rng.exponential(size=(3000, 5)), rng.exponential(size=(3000, 5)) * 2
    em, es = w1efp(ea, eb, n_batches=3)
    assert em.shape == (5,) and np.all(em == pytest.approx(1.0, abs=0.15))  # W1(Exp(1), Exp(2)) = 1
    with pytest.raises(OmnijetError, match="empty"):
        w1([], [1.0])
    with pytest.raises(OmnijetError, match="w1p"):
        w1p(xa[..., 0], ma, xb, mb)


def test_summary_metrics_same_vs_shifted():
    from omnijet_lib.metrics import jet_mass, summary_metrics

    rng = np.random.default_rng(4)

    def jets(n, width=0.4):
        x = np.zeros((n, 16, 3), np.float32)
        mask = np.arange(16)[None] < rng.integers(4, 17, n)[:, None]
        x[mask] = (rng.normal(size=(n, 16, 3)) * [0.8, width, width] + [2.0, 0, 0])[mask]
        return x, mask

    # wider jets: larger mass and angular spread; (relative-pT EFPs ignore a global pT scale)
    real, same, off = jets(300), jets(300), jets(300, width=0.6)
    m = jet_mass(*real)
    assert m.shape == (300,) and np.all(m > 0)
    a = summary_metrics(*real, *same, n_batches=3)
    b = summary_metrics(*real, *off, n_batches=3)
    assert set(a) == set(b) and all(np.isfinite(v) for v in a.values())
    for key in ("w1m", "w1p_eta_rel_scaled", "w1efp", "fpd", "kpd"):
        assert b[key] > 2 * a[key], (key, a[key], b[key])
    assert b["w1p_log_pt_scaled"] < 0.1


def test_roc_auc_known_cases():
    from omnijet_lib.metrics import roc_auc

    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # one inverted pair out of 2 x 2
    assert roc_auc([0, 0, 1, 1], [0.1, 0.7, 0.6, 0.9]) == 0.75


def test_mass_peaks_tells_one_peak_from_two():
    rng = np.random.default_rng(0)
    qg, top = rng.normal(60, 15, 1000), rng.normal(170, 15, 1000)
    two = mass_peaks(np.concatenate([qg, top]))
    assert two["both_peaks"] and abs(two["qg_peak_gev"] - 60) <= 10 and abs(two["top_peak_gev"] - 170) <= 10
    assert 90 <= two["dip_gev"] <= 140
    one = mass_peaks(np.concatenate([qg, rng.normal(60, 15, 1000)]))   # q/g only: no top peak
    assert not one["both_peaks"] and one["significance"][1] < 3
    smear = mass_peaks(rng.uniform(0, 230, 2000))                       # flat: neither stands out
    assert not smear["both_peaks"]
    with pytest.raises(OmnijetError, match="windows"):
        mass_peaks(qg, windows=((100, 200), (50, 60)))


def test_jet_shape_summary_skips_missing_tau32():
    s = jet_shape_summary([10.0, 170.0, 180.0], [0.2, np.nan, 0.6])
    assert s["median_mass"] == 170.0 and s["median_tau32"] == pytest.approx(0.4)
    assert not s["mass_peaks"]["both_peaks"]

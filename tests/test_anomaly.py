"""The density study's measures (notebook 06) on samples whose answers are known."""

import numpy as np
import pytest

from omnijet_lib.io import OmnijetError
from omnijet_lib.metrics import roc_auc, roc_curve
from omnijet_lib.studies.anomaly import (SCORES, anomaly_scores, auc_at_fixed_multiplicity, auc_table, calibration,
                                         efficiency_cut)

rng = np.random.default_rng(0)


def test_roc_curve_area_is_the_auc_ties_included():
    y = np.r_[np.ones(300), np.zeros(500)]
    for s in (np.r_[rng.normal(1, 1, 300), rng.normal(0, 1, 500)], np.round(np.r_[rng.normal(1, 1, 300), rng.normal(0, 1, 500)])):
        b, e = roc_curve(y, s)
        assert b[0] == e[0] == 0 and b[-1] == e[-1] == 1 and np.all(np.diff(b) >= 0) and np.all(np.diff(e) >= 0)
        assert np.trapz(e, b) == pytest.approx(roc_auc(y, s))
    with pytest.raises(OmnijetError, match="needs both classes"):
        roc_curve(np.ones(3), np.arange(3))


def test_auc_table_orients_every_score_for_every_class():
    labels = np.repeat([0, 1, 8], 400)
    obs = {"multiplicity": np.where(labels == 8, 60, 40) + rng.normal(0, 5, len(labels)),
           "mass": np.where(labels == 0, 40, 120) + rng.normal(0, 10, len(labels)), "tau32": rng.uniform(size=len(labels))}
    like = {"total": -obs["multiplicity"], "per_token": rng.normal(size=len(labels))}
    table = auc_table(anomaly_scores(like, obs), labels)
    assert sorted(table) == [1, 8] and set(table[8]) == set(SCORES) - {"corrected"}  # no reference given
    assert table[8]["total"] > 0.95 and table[8]["multiplicity"] > 0.95  # -log p grows with the constituents
    assert table[1]["multiplicity"] == pytest.approx(0.5, abs=0.06) and table[1]["mass"] > 0.95
    assert table[8]["neg_tau32"] == pytest.approx(0.5, abs=0.06)
    with pytest.raises(OmnijetError, match="no background jets"):
        auc_table({"s": np.arange(4.0)}, np.array([1, 1, 8, 8]))


def test_a_score_that_only_counts_constituents_knows_nothing_at_fixed_multiplicity():
    n = 4000
    labels = np.repeat([0, 8], n)
    # the same four multiplicities for both, signal jets more often long
    mult = np.r_[np.tile([10, 20, 30, 40], n // 4), np.repeat([10, 20, 30, 40], [400, 800, 1200, 1600])]
    counting = auc_at_fixed_multiplicity(mult.astype(float), mult, labels, n_bins=4)
    assert roc_auc(labels == 8, mult) > 0.6
    assert counting["auc"][8] == pytest.approx([0.5] * 4) and counting["mean"][8] == pytest.approx(0.5)
    knowing = auc_at_fixed_multiplicity(mult + 15.0 * (labels == 8), mult, labels, n_bins=4)  # beyond the count
    assert all(a > 0.9 for a in knowing["auc"][8])
    sparse = auc_at_fixed_multiplicity(mult.astype(float), mult, labels, n_bins=4, min_jets=10 * n)
    assert np.isnan(sparse["auc"][8]).all() and np.isnan(sparse["mean"][8])


def test_efficiency_cut_keeps_its_share():
    score = rng.normal(size=10_000)
    for keep in (0.1, 0.01):
        assert (score > efficiency_cut(score, keep)).mean() == pytest.approx(keep, abs=0.002)
    with pytest.raises(OmnijetError, match="must be in"):
        efficiency_cut(score, 0)


def test_calibration_tells_calibrated_from_overconfident():
    p = rng.uniform(size=50_000)
    y = rng.uniform(size=p.size) < p  # P(y) = p: calibrated
    good = calibration(p, y)
    over = calibration(np.clip((p - 0.5) * 3 + 0.5, 0, 1), y)  # pushed towards 0 and 1
    assert good["ece"] < 0.01 < 0.1 < over["ece"] and sum(good["jets"]) == p.size
    assert np.allclose(good["observed"], good["predicted"], atol=0.02)


def test_the_complexity_correction_removes_what_the_multiplicity_explains():
    from omnijet_lib.studies.anomaly import multiplicity_corrected

    g = np.random.default_rng(3)
    ref_mult = g.integers(10, 60, 5000)
    ref = 3.0 * ref_mult + g.normal(0, 1, ref_mult.size)  # -log p grows with the constituents
    mult = np.r_[g.integers(10, 60, 1000), g.integers(30, 60, 1000)]
    labels = np.repeat([0, 8], 1000)
    score = 3.0 * mult + g.normal(0, 1, mult.size) + 2.0 * (labels == 8)  # beyond the count: +2
    corrected = multiplicity_corrected(score, mult, ref, ref_mult)
    assert roc_auc(labels == 8, 3.0 * mult) > 0.65  # counting alone separates
    assert corrected[labels == 0].mean() == pytest.approx(0, abs=0.15) and corrected[labels == 8].mean() == pytest.approx(2, abs=0.15)
    assert roc_auc(labels == 8, corrected) > 0.9
    lonely = multiplicity_corrected(np.array([500.0]), np.array([150]), ref, ref_mult)  # no reference jet that long
    assert np.isfinite(lonely).all()
    with pytest.raises(OmnijetError, match="reference jets"):
        multiplicity_corrected(score, mult, ref[:5], ref_mult[:5])

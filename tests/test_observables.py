import awkward as ak
import numpy as np
import pytest
import vector

from omnijet_lib.observables import jet_mass, jet_observables, jet_pt, multiplicity, nsubjettiness, tau21, tau32


def _jets(list_of_ptetaphi):
    """Massless constituents from [(pt, eta, phi), ...] per jet."""
    pt = ak.Array([[c[0] for c in j] for j in list_of_ptetaphi])
    eta = ak.Array([[c[1] for c in j] for j in list_of_ptetaphi])
    phi = ak.Array([[c[2] for c in j] for j in list_of_ptetaphi])
    v = vector.zip({"pt": pt, "eta": eta, "phi": phi, "mass": pt * 0})
    return vector.zip({"px": v.px, "py": v.py, "pz": v.pz, "E": v.E})


def test_mass_of_two_massless_vectors():
    # m^2 = 2 pT1 pT2 (cosh deta - cos dphi)
    jets = _jets([[(300.0, 0.0, 0.0), (200.0, 0.3, 0.4)]])
    expected = np.sqrt(2 * 300 * 200 * (np.cosh(0.3) - np.cos(0.4)))
    assert jet_mass(jets)[0] == pytest.approx(expected, rel=1e-5)
    assert multiplicity(jets)[0] == 2


def test_pt_of_back_to_back_is_zero_and_collinear_adds():
    jets = _jets([[(100.0, 0.0, 0.0), (100.0, 0.0, np.pi)], [(100.0, 0.5, 1.0), (50.0, 0.5, 1.0)]])
    pt = jet_pt(jets)
    assert pt[0] == pytest.approx(0.0, abs=1e-3)
    assert pt[1] == pytest.approx(150.0, rel=1e-5)


def test_one_prong_has_small_tau21_three_prongs_small_tau32():
    rng = np.random.default_rng(0)

    def prongs(centres):
        out = []
        for eta0, phi0 in centres:
            for _ in range(8):
                out.append((rng.uniform(20, 60), eta0 + rng.normal(0, 0.01), phi0 + rng.normal(0, 0.01)))
        return out

    one = prongs([(0.0, 0.0)])
    two = prongs([(0.0, 0.0), (0.4, 0.3)])
    three = prongs([(0.0, 0.0), (0.4, 0.3), (-0.3, 0.4)])
    jets = _jets([one, two, three])
    t21, t32 = tau21(jets), tau32(jets)
    assert t21[0] > 0.5           # one prong: tau2 comparable to tau1 (both tiny)... ratio not small
    assert nsubjettiness(jets, 1)[0, 0] < 0.05  # ...but tau1 itself is tiny for one prong
    assert t21[1] < 0.2           # two prongs: tau2 << tau1
    assert t32[2] < 0.2           # three prongs: tau3 << tau2
    assert t32[1] > t32[2]


def test_jets_with_fewer_constituents_than_axes():
    jets = _jets([[(100.0, 0.0, 0.0)], [(100.0, 0.0, 0.0), (50.0, 0.2, 0.1)], [(1.0, 0.1, 0.1)] * 4])
    taus = nsubjettiness(jets, 3)
    assert taus.shape == (3, 3)
    assert np.all(taus[0] == 0)                     # a single constituent is exactly one prong
    assert taus[1, 0] > 0 and taus[1, 1] == 0
    assert np.all(np.isfinite(jet_observables(jets)["tau32"]))


def test_real_sample_masses(real_jets):
    obs = jet_observables(real_jets)
    labels = ak.to_numpy(real_jets.label)
    assert 150 < np.median(obs["mass"][labels == 8]) < 190  # t→bqq'
    assert np.median(obs["mass"][labels == 0]) < 100       # QCD
    assert np.median(obs["tau32"][labels == 8]) < np.median(obs["tau32"][labels == 0])

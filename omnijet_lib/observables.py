"""Jet observables from constituent 4-vectors (GeV), vectorised over awkward arrays.

Every function takes either the jet array of :func:`omnijet_lib.data.read_jetclass` or a jagged
array of constituent 4-vectors (``px, py, pz, E``), e.g. from
:func:`omnijet_lib.data.features_to_p4`, and returns one numpy value per jet.

N-subjettiness (Thaler & Van Tilburg): ``tau_N = sum_i pT_i min_k dR(i, k) / (R0 sum_i pT_i)``
with exclusive-kT axes (R = 0.8, beta = 1) found by FastJet.
"""

from __future__ import annotations

import warnings

import awkward as ak
import numpy as np
import vector

vector.register_awkward()

__all__ = [
    "quiet_fastjet", "constituents", "jet_p4", "jet_pt", "jet_eta", "jet_phi", "jet_mass", "multiplicity",
    "nsubjettiness", "tau21", "tau32", "jet_observables",
]

R0 = 0.8


def quiet_fastjet() -> None:
    """No FastJet banner on the first clustering (it would land in every notebook's output)."""
    import fastjet._swig as fjs

    fjs.ClusterSequence.set_fastjet_banner_stream(None)


def constituents(jets) -> ak.Array:
    """Jagged Momentum4D constituents of ``jets`` (a jet array or already constituents)."""
    part = jets.part if "part" in ak.fields(jets) else jets
    e = part.E if "E" in ak.fields(part) else part.energy
    return vector.zip({"px": part.px, "py": part.py, "pz": part.pz, "E": e})


def jet_p4(jets) -> ak.Array:
    """Jet 4-vector = sum of its constituents."""
    return ak.sum(constituents(jets), axis=1)


def jet_pt(jets) -> np.ndarray:
    """Jet transverse momentum in GeV."""
    return ak.to_numpy(jet_p4(jets).pt)


def jet_eta(jets) -> np.ndarray:
    return ak.to_numpy(jet_p4(jets).eta)


def jet_phi(jets) -> np.ndarray:
    return ak.to_numpy(jet_p4(jets).phi)


def jet_mass(jets) -> np.ndarray:
    """Invariant mass of the constituent sum in GeV (tiny negative m² from rounding → 0)."""
    p = jet_p4(jets)
    m2 = ak.to_numpy(p.E**2 - p.px**2 - p.py**2 - p.pz**2).astype(np.float64)
    return np.sqrt(np.clip(m2, 0, None))


def multiplicity(jets) -> np.ndarray:
    """Number of constituents per jet."""
    return ak.to_numpy(ak.num(constituents(jets), axis=1))


def _padded(arr: ak.Array, length: int) -> np.ndarray:
    return ak.to_numpy(ak.fill_none(ak.pad_none(arr, length, axis=1, clip=True), 0.0)).astype(np.float64)


def nsubjettiness(jets, n_max: int = 3, r0: float = R0, beta: float = 1.0) -> np.ndarray:
    """``tau_1 .. tau_{n_max}`` per jet, shape ``(n_jets, n_max)``.

    Jets with fewer than N constituents get ``tau_N = 0`` (they are perfectly N-pronged).
    """
    import fastjet

    quiet_fastjet()
    part = constituents(jets)
    n_jets = len(part)
    counts = ak.to_numpy(ak.num(part, axis=1))
    taus = np.zeros((n_jets, n_max))
    if n_jets == 0:
        return taus
    width = int(counts.max())
    pt = _padded(part.pt, width)                       # (J, M), 0 for padding
    rap = _padded(part.rapidity, width)
    phi = _padded(part.phi, width)
    norm = r0 * pt.sum(axis=1)
    p = ak.zip({"px": part.px, "py": part.py, "pz": part.pz, "E": part.E})
    jet_def = fastjet.JetDefinition(fastjet.kt_algorithm, r0)
    cs_all = fastjet.ClusterSequence(p, jet_def)
    for n in range(1, n_max + 1):
        ok = counts >= n
        if not ok.any():
            continue
        # FastJet cannot ask a jet for more exclusive axes than it has constituents
        cs = cs_all if ok.all() else fastjet.ClusterSequence(p[ok], jet_def)
        with warnings.catch_warnings():  # fastjet warns for every algorithm, kT included
            warnings.simplefilter("ignore", UserWarning)
            ex = cs.exclusive_jets(n_jets=n)
        axes = vector.zip({f: ex[f] for f in ("px", "py", "pz", "E")})
        a_rap = ak.to_numpy(axes.rapidity).reshape(-1, n)  # (J_ok, n)
        a_phi = ak.to_numpy(axes.phi).reshape(-1, n)
        drap = rap[ok][:, :, None] - a_rap[:, None, :]     # (J_ok, M, n)
        dphi = np.mod(phi[ok][:, :, None] - a_phi[:, None, :] + np.pi, 2 * np.pi) - np.pi
        dr = np.sqrt(drap**2 + dphi**2).min(axis=2) ** beta
        taus[ok, n - 1] = (pt[ok] * dr).sum(axis=1) / norm[ok]
    return taus


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def tau21(jets) -> np.ndarray:
    """tau_2 / tau_1 (0 where tau_1 = 0)."""
    t = nsubjettiness(jets, 2)
    return _ratio(t[:, 1], t[:, 0])


def tau32(jets) -> np.ndarray:
    """tau_3 / tau_2 (0 where tau_2 = 0)."""
    t = nsubjettiness(jets, 3)
    return _ratio(t[:, 2], t[:, 1])


def jet_observables(jets) -> dict[str, np.ndarray]:
    """All jet-level observables at once (one clustering): ``mass, pt, eta, phi, multiplicity,
    tau1, tau2, tau3, tau21, tau32``."""
    p = jet_p4(jets)
    t = nsubjettiness(jets, 3)
    m2 = ak.to_numpy(p.E**2 - p.px**2 - p.py**2 - p.pz**2).astype(np.float64)
    return {
        "mass": np.sqrt(np.clip(m2, 0, None)),
        "pt": ak.to_numpy(p.pt),
        "eta": ak.to_numpy(p.eta),
        "phi": ak.to_numpy(p.phi),
        "multiplicity": multiplicity(jets),
        "tau1": t[:, 0], "tau2": t[:, 1], "tau3": t[:, 2],
        "tau21": _ratio(t[:, 1], t[:, 0]),
        "tau32": _ratio(t[:, 2], t[:, 1]),
    }

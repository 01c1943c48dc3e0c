"""The embedded Pythia 8 + FastJet simulation: schema, cuts, truth matching, reproducibility, resume.

The simulations are tiny (20 jets per class, three classes) and cached for the session; the
config uses small chunks / files so that chunking and file splitting are exercised too.
"""

import os
import shutil

import awkward as ak
import numpy as np
import pytest
import uproot

from omnijet_lib.data import read_jetclass
from omnijet_lib import simulation as S
from omnijet_lib.data.jetclass import JET_BRANCHES, LABEL_BRANCHES, PART_BRANCHES
from omnijet_lib.io import OmnijetError
from omnijet_lib.observables import jet_mass

PER_CLASS = 20
CLASSES = ["QCD", "Hqql", "Tbqq"]
CFG = S.SimulationConfig(chunk_jets=8, jets_per_file=16)  # 2 files per class: 16 + 4 jets


def _simulate(out, workers=1, **kw):
    return S.simulate_dataset(out, PER_CLASS, seed=3, workers=workers, classes=kw.pop("classes", CLASSES),
                              progress=False, config=CFG, **kw)


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    _simulate(out)
    return out


@pytest.fixture(scope="session")
def sim_jets(sim_dir):
    return read_jetclass(str(sim_dir / "*.root"))


def _arrays(path):
    with uproot.open(path) as f:
        return f["tree"].arrays(library="np")


def test_files_named_like_official_and_schema_complete(sim_dir):
    names = sorted(p.name for p in sim_dir.glob("*.root"))
    assert names == ["HToWW2Q1L_000.root", "HToWW2Q1L_001.root", "TTBar_000.root", "TTBar_001.root",
                     "ZJetsToNuNu_000.root", "ZJetsToNuNu_001.root"]
    with uproot.open(sim_dir / "TTBar_000.root") as f:
        keys = set(f["tree"].keys())
    assert set(PART_BRANCHES) | set(JET_BRANCHES) | set(LABEL_BRANCHES) <= keys
    assert not list(sim_dir.glob(".*.part"))  # no temporary files left behind


def test_labels_and_counts(sim_jets, sim_dir):
    labels = ak.to_numpy(sim_jets.label)
    for name in CLASSES:
        assert (labels == S.class_index(name)).sum() == PER_CLASS
    assert len(read_jetclass(sim_dir / "TTBar_000.root")) == 16
    assert set(np.unique(ak.to_numpy(read_jetclass(sim_dir / "TTBar_001.root").label))) == {8}


def test_kinematic_cuts(sim_jets):
    n = ak.to_numpy(sim_jets.jet_nparticles)
    pt, eta = ak.to_numpy(sim_jets.jet_pt), ak.to_numpy(sim_jets.jet_eta)
    assert n.max() <= 128 and n.min() >= 2
    full = n < 128  # a truncated jet may lose a little pT; the cut is on the full jet
    assert np.all((pt[full] > 500) & (pt[full] < 1000))
    assert np.all(np.abs(eta) < 2.0 + 1e-3)
    part = sim_jets.part
    dr = ak.to_numpy(ak.max(np.hypot(ak.Array(_deta(sim_jets)), part.deltaphi(_axis(sim_jets))), axis=1))
    assert dr.max() < 1.0  # anti-kT R = 0.8 jets
    pts = part.pt
    assert ak.all(pts[:, :-1] >= pts[:, 1:])  # pT-ordered
    assert ak.min(pts) > 0.1  # detector thresholds (cells cut on energy, so forward ones are softer)
    tau = np.stack([ak.to_numpy(sim_jets[f"jet_tau{i}"]) for i in (1, 2, 3, 4)], 1)
    # filled, and falling with N (exclusive-kT axes are not minimised, so not strictly always)
    assert np.all(tau[:, 0] > 0) and np.mean(np.diff(tau, axis=1) <= 1e-6) > 0.9


def _axis(jets):
    import vector

    return vector.zip({"pt": jets.jet_pt, "eta": jets.jet_eta, "phi": jets.jet_phi, "mass": 0})


def _deta(jets):
    return jets.part.eta - jets.jet_eta


def test_physics_is_sane(sim_jets):
    mass = jet_mass(sim_jets)
    lab = ak.to_numpy(sim_jets.label)
    assert 140 < np.median(mass[lab == 8]) < 200        # t -> bqq'
    assert np.median(mass[lab == 0]) < 110               # q/g
    n = ak.to_numpy(sim_jets.jet_nparticles)
    assert 15 < n[lab == 0].mean() < 60


def test_same_seed_same_jets_in_process(sim_dir):
    jets = S.simulate_class("Tbqq", PER_CLASS, seed=3, config=CFG)
    a = _arrays(sim_dir / "TTBar_000.root")
    b = ak.to_numpy(ak.flatten(jets.part.px))
    np.testing.assert_array_equal(np.concatenate(a["part_px"]), b[: len(np.concatenate(a["part_px"]))])
    np.testing.assert_array_equal(a["jet_tau2"], ak.to_numpy(jets.jet_tau2)[:16])


def test_independent_of_worker_count(sim_dir, tmp_path):
    _simulate(tmp_path, workers=2, classes=["QCD", "Tbqq"])  # 6 chunks over 2 processes
    for name in ("ZJetsToNuNu_000.root", "ZJetsToNuNu_001.root", "TTBar_000.root", "TTBar_001.root"):
        a, b = _arrays(sim_dir / name), _arrays(tmp_path / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.concatenate(a[k]) if a[k].dtype == object else a[k],
                                          np.concatenate(b[k]) if b[k].dtype == object else b[k], err_msg=k)


def test_different_seed_different_jets(sim_dir):
    other = S.simulate_class("QCD", 8, seed=4, config=CFG)
    assert not np.array_equal(ak.to_numpy(other.jet_pt), _arrays(sim_dir / "ZJetsToNuNu_000.root")["jet_pt"][:8])


def test_resume_skips_finished_files(sim_dir, monkeypatch):
    before = {p: os.stat(p).st_mtime_ns for p in sim_dir.glob("*.root")}
    calls = []
    monkeypatch.setattr(S, "_simulate_chunk", lambda t: calls.append(t))
    paths = _simulate(sim_dir)
    assert calls == [] and len(paths) == 6
    assert {p: os.stat(p).st_mtime_ns for p in sim_dir.glob("*.root")} == before


def test_resume_redoes_only_missing_file(sim_dir, tmp_path):
    shutil.copytree(sim_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "TTBar_001.root").unlink()
    kept = os.stat(tmp_path / "TTBar_000.root").st_mtime_ns
    _simulate(tmp_path)
    assert os.stat(tmp_path / "TTBar_000.root").st_mtime_ns == kept
    np.testing.assert_array_equal(_arrays(tmp_path / "TTBar_001.root")["jet_pt"],
                                  _arrays(sim_dir / "TTBar_001.root")["jet_pt"])


def test_resume_redoes_empty_truncated_and_altered_files(sim_dir, tmp_path, caplog):
    shutil.copytree(sim_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "ZJetsToNuNu_000.root").write_bytes(b"")   # 0 bytes
    cut = tmp_path / "TTBar_000.root"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])                 # truncated
    flip = bytearray((tmp_path / "HToWW2Q1L_001.root").read_bytes())
    flip[-100] ^= 0xFF                                                           # same size, other bytes
    (tmp_path / "HToWW2Q1L_001.root").write_bytes(bytes(flip))
    kept = os.stat(tmp_path / "TTBar_001.root").st_mtime_ns
    with caplog.at_level("WARNING"):
        _simulate(tmp_path)
    assert sum("simulating it again" in r.message for r in caplog.records) == 3
    for name in ("ZJetsToNuNu_000.root", "TTBar_000.root", "HToWW2Q1L_001.root", "TTBar_001.root"):
        redone, original = _arrays(tmp_path / name), _arrays(sim_dir / name)
        assert redone.keys() == original.keys(), name
        for k in original:
            np.testing.assert_array_equal(np.concatenate(redone[k]) if redone[k].dtype == object else redone[k],
                                          np.concatenate(original[k]) if original[k].dtype == object else original[k])
    assert os.stat(tmp_path / "TTBar_001.root").st_mtime_ns == kept


def test_files_without_records_are_checked_once_and_kept(sim_dir, tmp_path, monkeypatch):
    """Caches simulated before records existed: intact files are kept (and recorded), not redone."""
    shutil.copytree(sim_dir, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / ".finished")
    wrong = tmp_path / "TTBar_001.root"
    wrong.write_bytes((sim_dir / "TTBar_000.root").read_bytes())  # readable, but 16 jets where 4 belong
    calls = []
    real = S._simulate_chunk
    monkeypatch.setattr(S, "_simulate_chunk", lambda t: calls.append(t) or real(t))
    _simulate(tmp_path)
    assert [(t[1], t[3]) for t in calls] == [(8, 4)]  # only the wrong file's chunk
    np.testing.assert_array_equal(_arrays(wrong)["jet_pt"], _arrays(sim_dir / "TTBar_001.root")["jet_pt"])
    assert len(list((tmp_path / ".finished").glob("*.json"))) == 6


def test_other_settings_in_same_dir_refused(sim_dir):
    with pytest.raises(OmnijetError, match="other settings"):
        S.simulate_dataset(sim_dir, PER_CLASS, seed=5, workers=1, classes=["QCD"], progress=False, config=CFG)


def test_config_validation():
    with pytest.raises(OmnijetError, match="per_class"):
        S.SimulationConfig(per_class=0)
    with pytest.raises(OmnijetError, match="chunk_jets"):
        S.SimulationConfig(chunk_jets=300, jets_per_file=1000)
    with pytest.raises(OmnijetError, match="unknown jet class"):
        S.simulate_dataset("unused", 5, classes=["Nope"], progress=False)


def test_cache_key_hashes_settings_not_workers(tmp_path, monkeypatch):
    a = S.SimulationConfig(per_class=300, seed=1)
    assert a.cache_key() == S.SimulationConfig(per_class=300, seed=1, workers=7).cache_key()
    assert a.cache_key() != S.SimulationConfig(per_class=300, seed=2).cache_key()
    assert a.cache_key() != S.SimulationConfig(per_class=300, seed=1, track_pt_min=1.0).cache_key()
    seen = {}
    monkeypatch.setattr(S, "simulate_dataset", lambda out, *a, **k: seen.update(out=out, args=a, kw=k))
    out = S.default_dataset(300, seed=1, root=tmp_path, workers=2)
    assert out == tmp_path / "simulated" / a.cache_key() and seen["out"] == out and seen["kw"]["classes"] is None
    # a subset of classes is simulated into the same cache folder (files are per class)
    assert S.default_dataset(300, seed=1, root=tmp_path, classes=["QCD", "Tbqq"]) == out
    assert seen["kw"]["classes"] == ["QCD", "Tbqq"]


def test_quiet(capfd):
    S._STATE.clear()  # force a fresh Pythia initialisation
    S.simulate_class("Wqq", 2, seed=1)
    out, err = capfd.readouterr()
    assert "PYTHIA" not in out + err and "FastJet" not in out + err


def test_truth_tree_follows_copies_and_intermediate_w():
    # toy record: 0 system, 1 t (copy) -> 2 t -> 3 b, 4 W+ -> 5 W+ (copy) -> 6 u, 7 d~; 8 nu
    ids = np.array([90, 6, 6, 5, 24, 24, 2, -1, 12])
    d1 = np.array([0, 2, 3, 0, 5, 6, 0, 0, 0])
    d2 = np.array([0, 2, 4, 0, 5, 7, 0, 0, 0])
    res, owner, leaf = S._truth(ids, d1, d2, np.zeros(9, np.int64), 6)
    assert res.tolist() == [2] and sorted(leaf.tolist()) == [3, 6, 7] and set(owner.tolist()) == {0}
    ids[7] = -11  # leptonic W: neutrinos are not required in the jet
    ids[6] = 12
    assert sorted(S._truth(ids, d1, d2, np.zeros(9, np.int64), 6)[2].tolist()) == [3, 7]


def test_matching_requires_every_decay_product():
    # one event, three jets; resonance at (0, 0) with products at (0.3, 0) and (-0.3, 0.2)
    j_eta, j_phi = np.array([0.05, 2.0, 0.1]), np.array([0.0, 1.0, 3.0])
    ok = np.array([True, True, True])
    args = (np.array([0]), np.array([0.0]), np.array([0.0]), np.array([0, 0]),
            np.array([0.3, -0.3]), np.array([0.0, 0.2]), np.array([0, 3]), j_eta, j_phi)
    assert S._match(*args, ok, 0.8).tolist() == [True, False, False]
    assert S._match(*args, np.array([False, True, True]), 0.8).tolist() == [False, False, False]
    far = list(args)
    far[4] = np.array([0.3, -0.9])  # one product outside dR 0.8
    assert not S._match(*far, ok, 0.8).any()


def test_validation_table(sim_dir, real_path):
    rows = S.validation_table(sim_dir, real_path)
    assert [r["class"] for r in rows] == ["QCD", "Hqql", "Tbqq"]
    for r in rows:
        assert r["n_sim"] == PER_CLASS and r["mass_sim"] > 0 and r["mult_sim"] > 0
        assert r["mult_ok"] in (True, False)
    assert rows[1]["mass_ok"] is None  # no mass target for H -> lvqq'
    text = S.format_validation_table(rows)
    assert "Tbqq" in text and len(text.splitlines()) == 4


def test_interrupted_run_resumes_from_finished_chunks(sim_dir, tmp_path, monkeypatch):
    real_chunk = S._simulate_chunk
    calls = []

    def interrupted(task):
        if calls:
            raise KeyboardInterrupt  # the second chunk is "killed"
        calls.append(task)
        return real_chunk(task)

    monkeypatch.setattr(S, "_simulate_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _simulate(tmp_path, classes=["Tbqq"])
    assert not (tmp_path / "TTBar_000.root").exists()           # no half-written file
    assert len(list((tmp_path / ".chunks").glob("*.npz"))) == 1  # the finished chunk is kept

    calls.clear()
    monkeypatch.setattr(S, "_simulate_chunk", lambda t: calls.append(t) or real_chunk(t))
    _simulate(tmp_path, classes=["Tbqq"])
    assert sorted(t[2] for t in calls) == [1, 2]  # chunk 0 was not redone
    assert not (tmp_path / ".chunks").exists()
    for name in ("TTBar_000.root", "TTBar_001.root"):
        np.testing.assert_array_equal(np.concatenate(_arrays(tmp_path / name)["part_px"]),
                                      np.concatenate(_arrays(sim_dir / name)["part_px"]))


def test_batch_sizes_do_not_change_the_jets(sim_dir, monkeypatch):
    import dataclasses

    procs = list(S.PROCESSES)
    procs[5] = dataclasses.replace(procs[5], jets_per_event=0.01)  # one big first batch instead of several
    monkeypatch.setattr(S, "PROCESSES", tuple(procs))
    res = S._simulate_chunk((dataclasses.replace(CFG, seed=3, per_class=PER_CLASS), 5, 0, 8))
    ref = _arrays(sim_dir / "HToWW2Q1L_000.root")
    np.testing.assert_array_equal(res["counts"], ref["jet_nparticles"][:8].astype(int))
    np.testing.assert_array_equal(res["px"], np.concatenate(ref["part_px"][:8]))


def test_script_without_main_guard_stops_with_one_line(tmp_path):
    """Worker processes import the main script again: one that simulates at top level used to
    wait forever for the cache lock its parent holds; now the workers stop and the parent says why."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from omnijet_lib import simulation as S\n"
                      f"S.simulate_dataset({str(tmp_path / 'sim')!r}, 4, seed=3, workers=2, classes=['QCD', 'Tbqq'],\n"
                      "                   progress=False, config=S.SimulationConfig(chunk_jets=2, jets_per_file=4))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode != 0
    assert "call it under `if __name__ == \"__main__\":`" in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("omnijet_lib.io.OmnijetError: ")
    assert "a simulation worker process died" in last

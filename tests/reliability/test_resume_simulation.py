"""An interrupted simulation resumes: ``omnijet simulate`` killed with SIGKILL after its first
class file exists; the rerun keeps that file untouched, simulates only the missing class, and
the jets equal those of an uninterrupted run with the same seed.

(Files are compared by content: uproot stamps each ROOT file with its creation time and a UUID.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import awkward as ak
import numpy as np
import pytest

from omnijet_lib.data import read_jetclass

from .conftest import PYTHON, snapshot

pytest.importorskip("omnijet_lib.simulation")

ARGS = ["--per-class", "4", "--seed", "5", "--workers", "1", "--classes", "QCD", "Wqq"]


def _simulate(out):
    return subprocess.Popen([PYTHON, "-m", "omnijet_lib.cli", "simulate", *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_kill_9_simulation_then_rerun(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    ref = _simulate(reference)
    victim = _simulate(killed)
    t0 = time.time()
    while not list(killed.glob("*.root")):  # the first finished class file
        assert victim.poll() is None, f"simulation ended early: {victim.communicate()}"
        assert time.time() - t0 < 120
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    at_kill = snapshot(killed)
    done = [n for n in at_kill if n.endswith(".root")]
    assert len(done) == 1, f"killed too late to test a resume: {sorted(at_kill)}"
    # its record (size, sha256) may or may not have been written before the kill: a rerun checks either way
    # (.lock: the advisory lock that makes two simulations into one folder take turns)
    assert all(n in ("simulation.json", ".lock", done[0], f".finished/{done[0]}.json") or n.endswith(".part")
               for n in at_kill)
    missing = ({"ZJetsToNuNu_000.root", "WToQQ_000.root"} - set(done)).pop()

    rerun = subprocess.run([PYTHON, "-m", "omnijet_lib.cli", "simulate", *ARGS, "--out", str(killed)],
                           capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"wrote 4 jets to {killed / missing}" in rerun.stderr
    assert done[0] not in rerun.stderr  # the finished file is not redone
    after = snapshot(killed)
    assert after[done[0]] == at_kill[done[0]]
    assert not [n for n in after if n.endswith(".part") and n not in at_kill]

    assert ref.wait(timeout=180) == 0, ref.communicate()[1][-2000:]
    for name in ("ZJetsToNuNu_000.root", "WToQQ_000.root"):
        a, b = read_jetclass(killed / name), read_jetclass(reference / name)
        assert len(a) == len(b) == 4
        for field in ("px", "py", "pz", "E"):
            assert ak.all(getattr(a.part, field) == getattr(b.part, field))
        assert np.array_equal(ak.to_numpy(a.label), ak.to_numpy(b.label))

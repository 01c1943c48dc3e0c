"""Interrupted training resumes: a tiny fit() (DeepSets, 6 epochs x 8 steps, _fit_worker.py) is
killed with SIGKILL after its first checkpoint; the rerun of the same command continues from
``last.ckpt`` at the right step and finishes. An uninterrupted run with the same seed runs
alongside for comparison.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from omnijet_lib.io import LOCK_FILE, load_checkpoint

from .conftest import PYTHON

WORKER = Path(__file__).with_name("_fit_worker.py")
STEPS_PER_EPOCH, EPOCHS = 8, 6


def _start(out: Path, seconds_per_step: float) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(WORKER), str(out), str(seconds_per_step)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    killed, reference = base / "killed", base / "reference"
    ref = _start(reference, 0.0)
    victim = _start(killed, 0.1)  # 0.1 s per step: ~0.8 s per epoch
    t0 = time.time()
    while not (killed / "last.ckpt").exists():
        assert victim.poll() is None, f"training ended early: {victim.communicate()[1][-2000:]}"
        assert time.time() - t0 < 120, "no checkpoint after 120 s"
        time.sleep(0.01)
    time.sleep(0.3)  # part way through the next epoch
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    at_kill = torch.load(killed / "last.ckpt", map_location="cpu", weights_only=True)  # complete file
    files_at_kill = sorted(p.name for p in killed.iterdir())
    lock_at_kill = (killed / LOCK_FILE).read_text()
    rerun = subprocess.run([PYTHON, str(WORKER), str(killed), "0"], capture_output=True, text=True, timeout=180)
    ref_out, ref_err = ref.communicate(timeout=180)
    assert ref.returncode == 0, ref_err[-2000:]
    return dict(killed=killed, reference=reference, victim=victim, at_kill=at_kill,
                files_at_kill=files_at_kill, lock_at_kill=lock_at_kill, rerun=rerun)


def test_kill_9_leaves_a_complete_checkpoint_part_way(runs):
    assert runs["victim"].returncode == -signal.SIGKILL
    at_kill = runs["at_kill"]
    assert 1 <= at_kill["epoch"] + 1 < EPOCHS  # killed after a checkpoint, before the end
    assert at_kill["global_step"] == STEPS_PER_EPOCH * (at_kill["epoch"] + 1)
    assert "model.safetensors" not in runs["files_at_kill"] and "run.json" not in runs["files_at_kill"]
    odd = [n for n in runs["files_at_kill"] if n not in ("last.ckpt", "best.ckpt", LOCK_FILE) and not n.endswith(".part")]
    assert not odd, f"files that look complete but are not checkpoints: {odd}"
    assert json.loads(runs["lock_at_kill"])["pid"] == runs["victim"].pid  # the folder's lock names its trainer


def test_rerun_takes_over_the_lock_of_the_killed_run(runs):
    assert (f"taking over the stale lock of process {runs['victim'].pid} on " in runs["rerun"].stderr)
    assert (runs["killed"] / LOCK_FILE).read_text() == ""  # released by the rerun


def test_rerun_resumes_at_the_right_step_and_finishes(runs):
    rerun, killed = runs["rerun"], runs["killed"]
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Restoring states from the checkpoint path at {killed / 'last.ckpt'}" in rerun.stderr
    done = json.loads((killed / "run.json").read_text())
    total = STEPS_PER_EPOCH * EPOCHS
    assert done == {"steps_run": total - runs["at_kill"]["global_step"], "global_step": total}
    final = torch.load(killed / "last.ckpt", map_location="cpu", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (EPOCHS - 1, total)
    assert not list(killed.glob("*.part")) or all(p.name.startswith(".") for p in killed.glob("*.part"))


def test_resumed_weights_equal_an_uninterrupted_run(runs):
    a, _ = load_checkpoint(runs["killed"] / "model.safetensors")
    b, _ = load_checkpoint(runs["reference"] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

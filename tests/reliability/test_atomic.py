"""Atomic outputs: a write that fails or is killed part way leaves the previous file intact and
no file that looks complete (temporaries are ``.<name>.<random>.part`` next to the target).

Interruptions: an exception inside ``atomic_path``, Ctrl-C, a failing figure/JSON/checkpoint
writer, and ``kill -9`` of a process in the middle of writing a big ROOT file or checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from omnijet_lib.data import read_jetclass, write_jetclass
from omnijet_lib.io import atomic_path, load_checkpoint, save_checkpoint, write_json

from .conftest import PYTHON, REPO, random_jets


def _sha(p: Path) -> str:
    return hashlib.sha1(p.read_bytes()).hexdigest()


def test_exception_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}\n')
    seen = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            tmp.write_text('{"new": ')  # half written
            raise RuntimeError("disk on fire")
    assert target.read_text() == '{"old": true}\n'
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".metrics.json.") and seen[0].suffix == ".part"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # temp removed


def test_ctrl_c_inside_atomic_path_keeps_old_file_and_no_new_one(tmp_path):
    old = tmp_path / "old.root"
    write_jetclass(old, random_jets(5))
    before = _sha(old)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(old) as tmp:
            tmp.write_bytes(b"root" + bytes(100))
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.root") as tmp:
            tmp.write_bytes(b"root")
            raise KeyboardInterrupt
    assert _sha(old) == before and len(read_jetclass(old)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.root"]


def test_failing_figure_keeps_previous_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from omnijet_lib.plotting import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    old = save_figure(fig, tmp_path / "mass", formats=("png",))[0]
    before = _sha(old)
    ax.set_title(r"$\frac{1}$")  # broken mathtext: fails while the PNG is being rendered
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "mass", formats=("png",))
    plt.close(fig)
    assert _sha(old) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mass.png"]


def test_full_disk_during_checkpoint_save_keeps_previous(tmp_path, monkeypatch):
    import errno

    import safetensors.torch as st

    old = save_checkpoint(tmp_path / "w.safetensors", {"w": torch.ones(3)}, {"epoch": 1})

    def half_then_enospc(tensors, filename, metadata=None):
        data = st.save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(st, "save_file", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(old, {"w": torch.zeros(3)}, {"epoch": 2})
    tensors, cfg = load_checkpoint(old)
    assert cfg == {"epoch": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_outputs_have_ordinary_permissions(tmp_path):
    """Temp files are created 0600; the renamed output must follow the umask like any file."""
    old = os.umask(0o022)
    try:
        paths = [write_json(tmp_path / "m.json", {}), write_jetclass(tmp_path / "j.root", random_jets(3)),
                 save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(1)})]
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {"0o644"}


# ------------------------------------------------------------------------- kill -9 mid-write
_WRITE_ROOT = """
import sys, numpy as np, awkward as ak, vector
sys.path.insert(0, {tests!r})
from reliability.conftest import random_jets
from omnijet_lib.data import write_jetclass
jets = random_jets(20000, label=3, seed=1, min_n=30, max_n=90)   # ~1.2M constituents
print("writing", flush=True)
write_jetclass({target!r}, jets)
print("done", flush=True)
"""

_WRITE_CKPT = """
import sys, time, torch, safetensors.torch as st
from omnijet_lib.io import save_checkpoint

def slow_save_file(tensors, filename, metadata=None):  # a slow disk: 64 kB every 5 ms
    data = st.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        for i in range(0, len(data), 1 << 16):
            f.write(data[i:i + (1 << 16)]); f.flush(); time.sleep(0.005)

st.save_file = slow_save_file
print("writing", flush=True)
save_checkpoint({target!r}, {{"w": torch.arange(4_000_000, dtype=torch.float32)}}, {{"epoch": 2}})
print("done", flush=True)
"""


def _kill_when_temp_grows(script: str, folder: Path, name: str, min_bytes: int, timeout: float = 90) -> None:
    """Run ``script``; SIGKILL it once its ``.<name>.*.part`` temp file holds ``min_bytes``."""
    proc = subprocess.Popen([PYTHON, "-c", script], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            parts = list(folder.glob(f".{name}.*.part"))
            if parts and parts[0].exists() and parts[0].stat().st_size >= min_bytes:
                break
            if proc.poll() is not None:
                raise AssertionError(f"writer ended before it was killed: {proc.communicate()}")
            time.sleep(0.002)
        else:
            raise AssertionError("the writer never started writing")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_while_writing_a_root_file(tmp_path):
    target = tmp_path / "HToGG_000.root"
    write_jetclass(target, random_jets(7))
    before = _sha(target)
    script = textwrap.dedent(_WRITE_ROOT).format(tests=str(REPO / "tests"), target=str(target))
    _kill_when_temp_grows(script, tmp_path, target.name, min_bytes=1)
    assert _sha(target) == before and len(read_jetclass(target)) == 7
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(n.startswith(".HToGG_000.root.") and n.endswith(".part") for n in leftovers)


def test_kill_9_while_writing_a_checkpoint(tmp_path):
    target = tmp_path / "model.safetensors"
    save_checkpoint(target, {"w": torch.ones(10)}, {"epoch": 1})
    before = _sha(target)
    script = textwrap.dedent(_WRITE_CKPT).format(target=str(target))
    _kill_when_temp_grows(script, tmp_path, target.name, min_bytes=4 << 20)  # a quarter written
    assert _sha(target) == before
    tensors, cfg = load_checkpoint(target)
    assert cfg == {"epoch": 1} and torch.equal(tensors["w"], torch.ones(10))
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".part")
    assert 0 < leftovers[0].stat().st_size < 16_000_000  # genuinely cut part way


def test_training_checkpoints_are_written_next_to_their_target(tmp_path, monkeypatch):
    """Lightning's own writer goes through the system temp folder and a move, which is a
    non-atomic copy across filesystems (node-local /tmp vs. a shared disk); fit() replaces it."""
    import importlib

    from .test_safe_loading import _toy_fit

    fit_mod = importlib.import_module("omnijet_lib.training.fit")  # the package re-exports fit()
    written = []
    real = fit_mod.atomic_path

    def recording(path):
        written.append(Path(path))
        return real(path)

    monkeypatch.setattr(fit_mod, "atomic_path", recording)
    _toy_fit(tmp_path / "run", epochs=2)
    assert {p.name for p in written} == {"last.ckpt", "best.ckpt"} and len(written) >= 4
    assert all(p.parent == tmp_path / "run" for p in written)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "best.ckpt", "last.ckpt"]
    assert (tmp_path / "run" / ".lock").read_text() == ""  # the run folder's lock, released

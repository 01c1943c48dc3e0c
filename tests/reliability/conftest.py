"""Shared helpers of the reliability suite: a random-jet builder, one-line-error checks, file
snapshots ("nothing written"), the CLI runner and a local HTTP server (tests never go online)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import vector

from omnijet_lib.data import make_jets
from omnijet_lib.io import LOCK_FILE, OmnijetError

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def random_jets(n: int = 12, label: int = 8, seed: int = 0, min_n: int = 3, max_n: int = 30) -> ak.Array:
    """Small boosted-looking jets (massless constituents around eta 0.5, phi 1.0), pT-ordered."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_n, max_n + 1, n)
    total = int(counts.sum())
    pt = ak.sort(ak.unflatten(rng.exponential(30, total) + 1, counts), axis=1, ascending=False)
    eta = ak.unflatten(rng.normal(0.5, 0.2, total), counts)
    phi = ak.unflatten(rng.normal(1.0, 0.2, total), counts)
    v = vector.zip({"pt": pt, "eta": eta, "phi": phi, "mass": pt * 0})
    return make_jets(vector.zip({"px": v.px, "py": v.py, "pz": v.pz, "E": v.E}), label)


def snapshot(folder: Path) -> dict:
    """``{relative path: sha1}`` of every file under ``folder`` (to prove nothing was written). A
    folder's released lock (an empty ``.lock``: a command that stopped on an error had taken it)
    holds no data and is left out; a lock that still names a holder counts."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not (p.name == LOCK_FILE and p.stat().st_size == 0)}


@contextlib.contextmanager
def one_line_error(*fragments: str, unchanged: Path | None = None):
    """Expect an OmnijetError whose message is one line containing every fragment; when
    ``unchanged`` is given, no file under it may be created, changed or removed."""
    before = snapshot(unchanged) if unchanged is not None else None
    with pytest.raises(OmnijetError) as info:
        yield info
    msg = str(info.value)
    assert "\n" not in msg, f"error spans several lines: {msg!r}"
    for f in fragments:
        assert str(f) in msg, f"{f!r} not in error {msg!r}"
    if before is not None:
        assert snapshot(unchanged) == before, "files changed although the call failed"


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: float = 120, code: str | None = None):
    """Run ``python -m omnijet_lib.cli ARGS`` (or ``python -c code ARGS``) in ``cwd``."""
    cmd = [PYTHON, "-c", code, *map(str, args)] if code else [PYTHON, "-m", "omnijet_lib.cli", *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_cli_error(proc, *fragments: str, strict: bool = True) -> str:
    """Exit status 1, no traceback, and one ``error: ...`` line naming every fragment.

    ``strict``: stderr is exactly that line (commands that fail before doing any work);
    otherwise progress/log lines may precede it, but the error is the last line.
    """
    err = proc.stderr.strip()
    assert proc.returncode == 1, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = err.splitlines()
    if strict:
        assert len(lines) == 1, f"stderr is not one line:\n{proc.stderr}"
    assert lines[-1].startswith("error: "), proc.stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1, proc.stderr
    for f in fragments:
        assert str(f) in lines[-1], f"{f!r} not in {lines[-1]!r}"
    return lines[-1]


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code ``cells`` whose first cell is tagged ``parameters`` (for papermill)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1: yields ``(folder, base_url)``."""
    folder = tmp_path / "served"
    folder.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield folder, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def jets_file(tmp_path):
    """A valid 12-jet JetClass-schema file (t→bqq' label)."""
    from omnijet_lib.data import write_jetclass

    return write_jetclass(tmp_path / "ok.root", random_jets())


def copy_as_ttree(src: Path, dst: Path, tree: str = "tree", drop=(), edit=None) -> Path:
    """Rewrite a JetClass file as a classic TTree (the format of the official files), optionally
    under another tree name, without some branches, or with ``edit(arrays_dict)`` applied."""
    import uproot

    arrays = uproot.open(src)["tree"].arrays()
    branches = {k: arrays[k] for k in arrays.fields if k not in drop}
    if edit is not None:
        edit(branches)
    with uproot.recreate(dst) as f:
        f.mktree(tree, branches, counter_name=lambda c: "part_n" if c.startswith("part_") else f"n{c}")
    return dst

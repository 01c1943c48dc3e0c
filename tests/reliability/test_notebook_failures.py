"""Notebook failures: the papermill batch stops at the first failing notebook, names it and the
cell (numbered as in the user's notebook, not papermill's copy with its injected cell), keeps
the figures already made, runs nothing after it, and exits non-zero.

The runner is pointed at a temporary notebooks/params folder holding two tiny notebooks.
"""

from __future__ import annotations

import nbformat
import pytest

import omnijet_lib.figures as figures
from omnijet_lib.io import OmnijetError

from .conftest import one_line_error, write_notebook


@pytest.fixture
def batch(tmp_path, monkeypatch):
    nbs, params, figs = tmp_path / "notebooks", tmp_path / "params", tmp_path / "figures"
    for d in (nbs, params, figs):
        d.mkdir()
    (figs / "earlier_run.png").write_bytes(b"an older figure")
    monkeypatch.setattr(figures, "NOTEBOOKS", nbs)
    monkeypatch.setattr(figures, "PARAMS", params)
    (params / "tiny.yaml").write_text(f"common:\n  figures_dir: {figs}\n")
    return nbs, params, figs


def test_batch_stops_at_first_failure_naming_notebook_and_cell(batch, capsys):
    nbs, params, figs = batch
    write_notebook(nbs / "00_first.ipynb", [
        'figures_dir = "."',
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "from omnijet_lib.plotting import save_figure\n"
        "fig, ax = plt.subplots(); ax.plot([0, 1])\n"
        "save_figure(fig, f'{figures_dir}/first_mass', formats=('png',))\n"
        "raise ValueError('mass histogram is empty')",
        "print('never reached')",
    ])
    write_notebook(nbs / "01_second.ipynb", [
        'figures_dir = "."',
        "open(f'{figures_dir}/second_ran.txt', 'w').write('ran')",
    ])
    assert figures.main(["--profile", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    executed = nbs / "executed" / "00_first.ipynb"
    assert err.count("\n") == 0 and err == (
        "error: 00_first.ipynb: cell 2 failed (ValueError: mass histogram is empty) at "
        f"`import matplotlib`; executed copy: {executed}")
    assert (figs / "first_mass.png").stat().st_size > 1000  # made before the failure: kept
    assert (figs / "earlier_run.png").read_bytes() == b"an older figure"
    assert not (figs / "second_ran.txt").exists()  # the second notebook never ran
    assert not (nbs / "executed" / "01_second.ipynb").exists()
    run = nbformat.read(str(executed), as_version=4)  # the executed copy holds the traceback
    assert any(o.get("ename") == "ValueError" for c in run.cells for o in c.get("outputs", []))


def test_kernel_death_is_one_line_too(batch):
    nbs, _, _ = batch
    write_notebook(nbs / "00_crash.ipynb", ['figures_dir = "."', "import os\nos._exit(3)"])
    with one_line_error("00_crash.ipynb: execution aborted (DeadKernelError: Kernel died)",
                        f"executed copy: {nbs / 'executed' / '00_crash.ipynb'}"):
        figures.run_figures("tiny")


def test_unreadable_notebook_and_unknown_prefix(batch):
    nbs, params, _ = batch
    write_notebook(nbs / "00_ok.ipynb", ['figures_dir = "."', "pass"])
    with one_line_error("no notebook matches ['07']", unchanged=nbs):
        figures.run_figures("tiny", only=["07"])
    (nbs / "01_broken.ipynb").write_text("{ not json")
    with one_line_error(f"{nbs / '01_broken.ipynb'}: not a readable notebook (NotJSONError", unchanged=nbs):
        figures.run_figures("tiny", dry_run=True)

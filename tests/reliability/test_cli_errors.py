"""Bad inputs through the ``omnijet`` command line (subprocesses): exit status 1, stderr one line
``error: ...`` naming the file/parameter and the problem, no traceback, nothing written.

All the quick cases are launched at once (each is mostly interpreter start-up) and checked one by
one; each runs in its own folder, which must be unchanged afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from .conftest import PYTHON, REPO, assert_cli_error, random_jets, run_cli, snapshot

# name -> (command line, fragments the error line must contain); "{d}" is the case's folder
CASES = {
    "profile_missing": (["figures", "--profile", "no_such_profile", "--dry-run"],
                        ["no_such_profile.yaml: parameter profile not found (known profiles: ci"]),
    "yaml_syntax": (["figures", "--profile", "{d}/broken.yaml", "--dry-run"],
                    ["{d}/broken.yaml: line 4 invalid YAML (expected ',' or ']'"]),
    "yaml_not_mapping": (["figures", "--profile", "{d}/list.yaml", "--dry-run"],
                         ["{d}/list.yaml: a profile maps 'common' and notebook names to dicts"]),
    "param_typo_common": (["figures", "--profile", "{d}/typo.yaml", "--dry-run"],
                          ["{d}/typo.yaml: common parameter(s) per_clas not declared by any notebook"]),
    "negative_size": (["figures", "--profile", "{d}/negative.yaml", "--dry-run"],
                      ["{d}/negative.yaml: section 00_dataset: per_class must be positive, got -300"]),
    "sim_negative": (["simulate", "--per-class", "-5", "--out", "{d}/sim"], ["--per-class must be positive, got -5"]),
    "sim_workers": (["simulate", "--per-class", "5", "--workers", "0", "--out", "{d}/sim"],
                    ["--workers must be positive, got 0"]),
    "sim_unknown_class": (["simulate", "--per-class", "5", "--out", "{d}/sim", "--classes", "QCD", "Higgs"],
                          ["unknown jet class 'Higgs'; known: QCD"]),
    "sim_out_is_file": (["simulate", "--per-class", "5", "--out", "{d}/taken"],
                        ["{d}/taken: output path exists and is not a directory"]),
    "sim_out_parent_is_file": (["simulate", "--per-class", "5", "--out", "{d}/taken/sim"],
                               ["{d}/taken/sim: Not a directory"]),
    "sim_no_classes": (["simulate", "--per-class", "5", "--out", "{d}/sim", "--classes"],
                       ["--classes names no class, so nothing would be selected"]),
    "tok_no_classes": (["tokenize", "--tokenizer", "{d}/t.safetensors", "--in", "{d}/x.root", "--out", "{d}/o",
                        "--classes"], ["--classes names no class, so nothing would be selected"]),
    "tok_device": (["tokenize", "--tokenizer", "{d}/t.safetensors", "--in", "{d}/x.root", "--out", "{d}/o",
                    "--device", "foo"], ["--device 'foo': not a device (cpu, cuda, cuda:1, mps)"]),
    "tok_max_len": (["tokenize", "--tokenizer", "{d}/t.safetensors", "--in", "{d}/x.root", "--out", "{d}/o",
                     "--max-len", "1000000000"], ["--max-len 1000000000: at most 65536 constituents per jet"]),
    "figures_only_empty": (["figures", "--only"], ["--only names no notebook"]),
    "profile_wrong_type": (["figures", "--profile", "{d}/typed.yaml", "--dry-run"],
                           ["{d}/typed.yaml: section 01_token_quality: codebook_sizes must be list[int] "
                            "(default: [64, 256]), got int 512"]),
    "dry_run_missing_input": (["figures", "--profile", "{d}/missing.yaml", "--dry-run", "--only", "00"],
                              ["{d}/missing.yaml: inputs missing for 00_dataset (the MISSING lines above)"]),
}

FILES = {
    "profile_wrong_type": {"typed.yaml": "01_token_quality:\n  codebook_sizes: 512\n"},
    "dry_run_missing_input": {"missing.yaml": "00_dataset:\n  data_files: no_such_folder/*.root\n"},
    "yaml_syntax": {"broken.yaml": "common:\n  per_class: 10\n  seed: [1, 2\n"},
    "yaml_not_mapping": {"list.yaml": "- per_class\n- 10\n"},
    "param_typo_common": {"typo.yaml": "common:\n  per_clas: 10\n"},
    "negative_size": {"negative.yaml": "00_dataset:\n  per_class: -300\n"},
    "sim_out_is_file": {"taken": "a file"},
    "sim_out_parent_is_file": {"taken": "a file"},
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Launch every case concurrently; ``{name: (proc result, folder, snapshot before)}``."""
    base = tmp_path_factory.mktemp("cli")
    procs = {}
    for name, (args, _) in CASES.items():
        d = base / name
        d.mkdir()
        for fname, text in FILES.get(name, {}).items():
            (d / fname).write_text(text)
        argv = [a.format(d=d) for a in args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs[name] = (subprocess.Popen([PYTHON, "-m", "omnijet_lib.cli", *argv], cwd=d, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE), d, snapshot(d))
    out = {}
    for name, (p, d, before) in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = (subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), d, before)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_cli_error(cli_runs, name):
    proc, d, before = cli_runs[name]
    assert_cli_error(proc, *[f.format(d=d) for f in CASES[name][1]])
    assert snapshot(d) == before, "the failed command wrote or changed files"


def test_mistyped_option_is_a_usage_error(tmp_path):
    """argparse's convention: exit status 2, the usage and one error line; nothing runs."""
    proc = run_cli("simulate", "--per-class", "5", "--out", tmp_path / "sim", "--seeed", "3", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "omnijet simulate: error: unrecognized arguments: --seeed 3"
    assert not (tmp_path / "sim").exists()


def test_bad_data_file_through_the_figures_command(tmp_path, jets_file):
    """A user's truncated JetClass file given to notebook 00 (``data_files``): the batch stops
    with one line naming the notebook, the cell, and the file's problem."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    shutil.copy(REPO / "notebooks" / "00_dataset.ipynb", nbdir)
    cut = tmp_path / "cut.root"
    cut.write_bytes(jets_file.read_bytes()[:3000])
    profile = tmp_path / "mine.yaml"
    profile.write_text(json.dumps({"00_dataset": {"data_files": str(cut), "figures_dir": str(tmp_path / "figs")}}))
    # the installed CLI, with the notebooks folder pointed at the copy (the repo stays untouched)
    code = ("import sys, pathlib, omnijet_lib.figures as f, omnijet_lib.cli as cli; "
            "f.NOTEBOOKS = pathlib.Path(sys.argv[1]); sys.exit(cli.main(sys.argv[2:]))")
    proc = run_cli(nbdir, "figures", "--profile", profile, cwd=tmp_path, code=code, timeout=240)
    line = assert_cli_error(proc, "00_dataset.ipynb: cell 4 failed (OmnijetError:",
                            f"{cut}: truncated or corrupt ROOT file", "at `files = dataset_files(",
                            f"executed copy: {nbdir / 'executed' / '00_dataset.ipynb'}", strict=False)
    assert len(line) < 600
    assert not snapshot(tmp_path / "figs")  # no figure (the run's lock, released, holds nothing)

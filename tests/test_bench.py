"""``omnijet bench``: the table is built from the scripts' JSON, failures are reported, the suite runs.

Benchmarks are measurements, not timed tests: these check behaviour only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omnijet_lib import bench

REPO = Path(__file__).resolve().parents[1]


def _ok(data: dict) -> dict:
    return {"returncode": 0, "json": data, "stdout": "", "stderr": "", "seconds": 1.0}


CANNED = {
    "loading": _ok({"jets": 20000, "summary": [
        {"benchmark": "ROOT -> padded tensors", "ours": 70000.0, "reference": 20000.0, "unit": "jets/s",
         "ratio": 3.5, "target": ">= 60000 jets/s on one core", "met": True}]}),
    "generation": _ok({"rows": [{"batch": 32, "generate": {"jets_per_s": 300.0, "threads": 2}}], "summary": [
        {"benchmark": "GPT generation, batch 32", "ours": 300.0, "reference": 2.0, "unit": "jets/s", "ratio": 150.0,
         "target": ">= 150x", "met": True, "peak_rss_mb": 900.0, "note": "reference once"}]}),
    "epic_fm": _ok({"rows": [{"config": "light", "mode": "sample", "jets_per_s": 50.0, "jets_per_s_100_steps": 2.0,
                              "ode_steps": 4, "threads": 1},
                             {"config": "jetclass", "mode": "sample", "jets_per_s": 30.0, "jets_per_s_100_steps": 0.6,
                              "ode_steps": 2, "threads": 1}], "summary": [
        {"benchmark": "EPiC-FM jetclass sample", "ours": 30.0, "reference": None, "unit": "jets/s", "ratio": None,
         "target": "report", "met": None}]}),
    "tokenization": _ok({"summary": [
        {"benchmark": "VQ-VAE training", "ours": 40.0, "reference": 10.0, "unit": "jets/s", "ratio": 4.0,
         "target": ">= 8x", "met": False}]}),
}


def test_summarise_builds_table_from_canned_json():
    rows = bench.summarise(CANNED)
    names = [r["benchmark"] for r in rows]
    assert names[:4] == ["ROOT -> padded tensors", "GPT generation, batch 32", "EPiC-FM jetclass sample",
                         "VQ-VAE training"]
    cross = rows[-1]  # OmniJet-α vs EPiC-FM sampling, from two scripts, JetClass config at 100 steps
    assert "EPiC-FM jetclass" in cross["benchmark"]
    assert cross["ours"] == 300.0 and cross["reference"] == 0.6 and cross["ratio"] == pytest.approx(500.0)
    table = bench.format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark") and "ratio" in lines[0] and "met" in lines[0]
    assert len({len(ln) for ln in lines[:2 + len(rows)]}) == 1  # aligned columns
    gen = next(ln for ln in lines if "GPT generation" in ln)
    assert "150x" in gen and "yes" in gen and "900 MB" in gen
    assert "NO" in next(ln for ln in lines if "VQ-VAE training" in ln)  # a missed target is shown
    assert "70,000 jets/s" in next(ln for ln in lines if "ROOT" in ln)
    assert "- GPT generation, batch 32: reference once" in table


def test_streaming_memory_list_json_is_adapted():
    """benchmarks/streaming_memory.py writes a plain list of rows; the runner summarises it."""
    data = [{"jets": 20000, "chunk": 10000, "stream_peak_mb": 400, "stream_jets_per_s": 3000, "in_memory_peak_mb": 900},
            {"jets": 80000, "chunk": 10000, "stream_peak_mb": 500, "stream_jets_per_s": 3100, "in_memory_peak_mb": 2500},
            {"jets": 80000, "chunk": 20000, "stream_peak_mb": 700, "stream_jets_per_s": 3100}]  # extra chunk: note only
    (row,) = bench.summarise({"streaming_memory": _ok(data)})
    assert row["unit"] == "MB" and row["ours"] == 500 and row["reference"] == 2500 and row["ratio"] == 5.0
    assert row["met"] is False  # 400 -> 500 MB is not flat
    assert "chunk 20000: 700 MB" in row["note"]


def test_summarise_reports_failures_and_missing_summary():
    runs = {"loading": {"returncode": 1, "json": None, "stdout": "", "stderr": "Traceback\nValueError: boom\n"},
            "simulation": _ok({"per_class": []})}
    rows = bench.summarise(runs)
    assert rows[0]["failed"] and "ValueError: boom" in rows[0]["note"]
    assert "FAILED" in bench.format_table(rows)
    assert "no \"summary\"" in rows[1]["note"]


def _fake_suite(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "loading.py").write_text(
        "import argparse, json\n"
        "p = argparse.ArgumentParser(); p.add_argument('--small', action='store_true'); p.add_argument('--json')\n"
        "a = p.parse_args()\n"
        "open(a.json, 'w').write(json.dumps({'summary': [{'benchmark': 'fake load', 'ours': 2.0, 'reference': 1.0,"
        " 'unit': 'jets/s', 'ratio': 2.0, 'target': '>= 1x', 'met': True}]}))\n")
    (d / "generation.py").write_text("raise SystemExit('generation exploded')\n")
    return d


def test_failing_script_reported_and_nonzero_exit(tmp_path, capsys, monkeypatch):
    d = _fake_suite(tmp_path)
    monkeypatch.setattr(bench, "machine_info", lambda: {  # no torch import needed for this
        "nproc": 2, "cpu": "x", "platform": "p", "python": "3", "torch": "t", "torch_threads": 1, "cuda": False,
        "load_average": [0.0, 0.0, 0.0]})
    out = tmp_path / "results.json"
    code = bench.main(["--small", "--only", "loading", "generation", "--json", str(out), "--bench-dir", str(d)])
    assert code != 0
    printed = capsys.readouterr().out
    assert "fake load" in printed and "FAILED" in printed  # the other benchmark still ran and is in the table
    res = json.loads(out.read_text())
    assert res["runs"]["loading"]["returncode"] == 0 and res["runs"]["generation"]["returncode"] != 0
    assert any("generation exploded" in r.get("note", "") for r in res["summary"])
    # all succeed -> exit 0
    assert bench.main(["--small", "--only", "loading", "--json", str(out), "--bench-dir", str(d)]) == 0


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(bench.OmnijetError, match="unknown benchmark nope"):
        bench.main(["--only", "nope"])


@pytest.mark.slow
def test_whole_suite_runs_at_its_smallest_size(tmp_path):
    """CI runs every benchmark script at its smallest size through the CLI (~4 min on 2 cores);
    the numbers are noise there, so only that each ran and reported sane rows is checked."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "omnijet_lib.cli", "bench", "--small", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "ROOT -> padded" in proc.stdout and "torch" in proc.stdout
    res = json.loads(out.read_text())
    assert res["size"] == "small" and res["complete"] and res["machine"]["nproc"] >= 1
    assert set(res["runs"]) == set(bench.SUITE)
    assert all(run["returncode"] == 0 for run in res["runs"].values())
    rows = res["summary"]
    assert not any(r.get("failed") for r in rows)
    assert {r["benchmark"].split(",")[0] for r in rows} >= {
        "ROOT -> padded tensors", "simulation", "VQ-VAE tokenization", "VQ-VAE training", "GPT training",
        "GPT generation", "EPiC-FM light train", "streaming tokenization", "sampling: OmniJet-α vs EPiC-FM jetclass"}
    for r in rows:
        assert r["ours"] > 0, r
        if r["reference"] and r["unit"] == "jets/s":  # memory rows: reference / ours (smaller is better)
            assert r["ratio"] == pytest.approx(r["ours"] / r["reference"], rel=1e-6), r
    loading = res["runs"]["loading"]["json"]
    assert loading["identical_output"] is True and loading["workers_identical_output"] is True

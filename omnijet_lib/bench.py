"""``omnijet bench``: run the benchmark scripts side by side and print one table of ours vs reference.

    omnijet bench                    # default sizes: the whole suite in <= 15 min on 2 idle CPU cores
    omnijet bench --small            # smallest sizes (CI: the suite runs, the numbers are noise)
    omnijet bench --full             # the scripts' biggest sizes (paper batch sizes; about an hour)
    omnijet bench --only loading generation --json benchmarks/results.json
    omnijet bench --threads 1        # torch threads for every torch benchmark (robust on a shared machine)

Each script in ``benchmarks/`` runs in its own subprocess (``python benchmarks/X.py ... --json``)
and writes a JSON with a top-level ``"summary"`` list of uniform rows
``{benchmark, ours, reference, unit, ratio, target, met[, peak_rss_mb, note]}``; ratio is
ours / reference in jets/s. This module only gathers those rows (plus the EPiC-FM vs OmniJet-α
sampling comparison, which needs two scripts), prints them with the machine and torch settings,
and writes every script's full JSON to ``benchmarks/results.json``. A failing script becomes a
FAILED row and a non-zero exit status; the others still run. Benchmarks are measurements, not
tests: a missed target does not change the exit status. Rows are medians of >= 3 repeats where
the script does that; each row's note says how it was timed where it does not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .io import OmnijetError, write_json

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"

#: Script arguments per size. "default" is sized for <= 15 min on 2 idle CPU cores and uses the
#: issues' batch sizes where the reference allows it: loading at 200k jets, generation at batch 256
#: (generate_reference needs ~4 min for it), GPT training at batch 256; VQ-VAE training at batch
#: 256 instead of 512 (a naive step at 512 takes ~45 s and ~10 GB). "full" = each script's own
#: defaults (its largest sizes: generation at batch 256 and 1024, VQ-VAE training at batch 512).
SUITE: dict[str, dict[str, list[str]]] = {
    "loading": {"small": ["--small"], "default": [], "full": []},
    "simulation": {
        "small": ["--jets", "5", "--repeats", "1", "--scaling-jets", "5", "--scaling-classes", "QCD", "Tbqq"],
        # scaling: one full 500-jet chunk per class, so that the pool's start-up (~0.7 s) and Pythia's
        # (~0.5 s per class and worker) weigh as little as in a real dataset (at 100 jets: 1.6x, not 1.95x)
        "default": ["--jets", "20", "--repeats", "3", "--scaling-jets", "500",
                    "--scaling-classes", "QCD", "Hbb", "Wqq", "Tbqq"],
        "full": [],
    },
    "tokenization": {
        "small": ["--small"],
        "default": ["--jets", "2048", "--batch-size", "256", "--train-batch-size", "256", "--train-steps", "2",
                    "--train-jets", "4096"],
        "full": [],
    },
    "gpt_training": {"small": ["--small"], "default": ["--batch", "256"], "full": []},
    "generation": {"small": ["--small"], "default": ["--batches", "256"], "full": []},
    "epic_fm": {"small": ["--small"], "default": [], "full": []},
    # no --small in this script; its JSON is a list of rows without "summary" (see ADAPTERS)
    "streaming_memory": {"small": ["--sizes", "20000", "40000"], "default": [], "full": ["--paper-size"]},
}
#: Scripts that take ``--threads`` (torch threads); loading and simulation are single-threaded.
THREADED = {"tokenization", "gpt_training", "generation", "epic_fm", "streaming_memory"}
COLUMNS = ("benchmark", "ours", "reference", "ratio", "target", "met", "peak RSS")


# --------------------------------------------------------------------------- running
def run_script(name: str, args: list[str], out_json: Path, timeout: float | None = None,
               bench_dir: Path = BENCH_DIR) -> dict:
    """Run ``bench_dir/name.py args --json out_json``; return {name, cmd, returncode, seconds, json,
    stdout, stderr} (the JSON is kept even after a non-zero exit, e.g. a script that flags a missed target)."""
    cmd = [sys.executable, str(bench_dir / f"{name}.py"), *args, "--json", str(out_json)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=bench_dir.parent, timeout=timeout)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        code, stdout, stderr = "timeout", _text(err.stdout), _text(err.stderr) + f"\ntimed out after {timeout} s"
    res = {"name": name, "cmd": cmd, "returncode": code, "seconds": time.perf_counter() - t0,
           "stdout": stdout[-6000:], "stderr": stderr[-3000:], "json": None}
    try:
        res["json"] = json.loads(out_json.read_text())
    except (OSError, ValueError) as err:
        if code == 0:
            res["returncode"], res["stderr"] = "no-json", f"{out_json}: {err}\n" + res["stderr"]
    return res


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


# --------------------------------------------------------------------------- summarising
def summarise(runs: dict[str, dict]) -> list[dict]:
    """Table rows from the runs: each script's "summary" rows, a FAILED row per failed script,
    then the cross-script rows. Pure function of the (canned) run records."""
    rows = []
    for name, run in runs.items():
        if run["returncode"] != 0:
            why = _last_line(run["stderr"]) or _last_line(run["stdout"])
            rows.append({"benchmark": name, "ours": None, "reference": None, "unit": "", "ratio": None,
                         "target": "", "met": None, "failed": True,
                         "note": f"FAILED (exit {run['returncode']}): {why}"})
            continue
        data = run["json"]
        summary = data.get("summary") if isinstance(data, dict) else None
        if not summary and name in ADAPTERS:
            summary = ADAPTERS[name](data)
        if not summary:
            rows.append({"benchmark": name, "ours": None, "reference": None, "unit": "", "ratio": None,
                         "target": "", "met": None, "note": "ran, but its JSON has no \"summary\"; see results.json"})
            continue
        rss = data.get("peak_rss_mb") if isinstance(data, dict) else None  # script-wide peak, if that is all
        rows.extend({"peak_rss_mb": rss, **r, "source": name} for r in summary)
    rows.extend(cross_rows(runs))
    return rows


def _streaming_memory_rows(rows: list[dict]) -> list[dict]:
    """benchmarks/streaming_memory.py writes a list of {jets, chunk, stream_peak_mb, in_memory_peak_mb, ...}:
    the sizes at its main chunk, then possibly extra chunks. Memory row: ratio = in-memory / streaming
    peak RSS (how many times less memory), target: flat from the smallest to the largest size."""
    main = [r for r in rows if r.get("chunk") == rows[0].get("chunk")]
    lo, hi = min(main, key=lambda r: r["jets"]), max(main, key=lambda r: r["jets"])
    growth = hi["stream_peak_mb"] / lo["stream_peak_mb"]
    ref = hi.get("in_memory_peak_mb")
    extra = "".join(f"; chunk {r['chunk']}: {r['stream_peak_mb']} MB" for r in rows if r not in main)
    return [{"benchmark": f"streaming tokenization, peak RSS at {hi['jets']:,} jets", "ours": hi["stream_peak_mb"],
             "reference": ref, "unit": "MB", "ratio": ref / hi["stream_peak_mb"] if ref else None,
             "target": "flat in jets (< 1.15x)", "met": growth < 1.15, "peak_rss_mb": hi["stream_peak_mb"],
             "note": f"reference = in-memory load_padded + tokenize, ratio = its peak / streaming peak; streaming "
                     f"{lo['stream_peak_mb']} -> {hi['stream_peak_mb']} MB (x{growth:.2f}) for {lo['jets']:,} -> "
                     f"{hi['jets']:,} jets at chunk {hi.get('chunk', '?')}{extra}; {hi['stream_jets_per_s']:,} "
                     f"jets/s; one run each"}]


#: Summaries for scripts whose JSON has no "summary" list (owned elsewhere; parsed here).
ADAPTERS = {"streaming_memory": _streaming_memory_rows}


def cross_rows(runs: dict[str, dict]) -> list[dict]:
    """OmniJet-α generation vs EPiC-FM sampling (JetClass config, ~100 ODE steps as in the paper)."""
    gen, epic = (runs.get(k, {}) for k in ("generation", "epic_fm"))
    if gen.get("returncode") != 0 or epic.get("returncode") != 0:
        return []
    g_rows = (gen["json"] or {}).get("rows") or []
    e_rows = [r for r in (epic["json"] or {}).get("rows", []) if r.get("mode") == "sample"]
    e_rows = sorted(e_rows, key=lambda r: r["config"] != "jetclass")  # prefer the JetClass config
    if not g_rows or not e_rows:
        return []
    g, e = g_rows[-1], e_rows[0]
    ours, ref = g["generate"]["jets_per_s"], e["jets_per_s_100_steps"]
    return [{"benchmark": f"sampling: OmniJet-α vs EPiC-FM {e['config']}", "ours": ours, "reference": ref,
             "unit": "jets/s", "ratio": ours / ref, "target": "report", "met": None, "source": "generation+epic_fm",
             "note": f"GPT generate at batch {g['batch']} ({g['generate']['threads']} threads) vs EPiC-FM at "
                     f"100 midpoint steps (from {e['ode_steps']}, {e['threads']} thread(s))"}]


def _num(v, unit: str = "") -> str:
    if v is None:
        return "-"
    s = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{s} {unit}".strip()


def _ratio(v) -> str:
    return "-" if v is None else (f"{v:,.0f}x" if v >= 100 else f"{v:.2g}x" if v < 1 else f"{v:.1f}x")


def format_table(rows: list[dict]) -> str:
    """A Markdown table (pastes into the README) followed by the per-row notes."""
    cells = []
    for r in rows:
        met = "FAILED" if r.get("failed") else {True: "yes", False: "NO", None: "-"}[r.get("met")]
        rss, unit = r.get("peak_rss_mb"), r.get("unit", "")
        cells.append((r["benchmark"], _num(r.get("ours"), unit), _num(r.get("reference"), unit), _ratio(r.get("ratio")),
                      r.get("target") or "-", met, "-" if rss is None else f"{rss:,.0f} MB"))
    width = [max(len(c) for c in col) for col in zip(COLUMNS, *cells)]

    def line(c):
        return "| " + " | ".join(x.ljust(w) for x, w in zip(c, width)) + " |"

    out = [line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in width) + "|", *map(line, cells)]
    notes = [f"- {r['benchmark']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + ([""] + notes if notes else []))


def machine_info() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "load_average": list(os.getloadavg())}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def header(m: dict) -> str:
    return (f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['platform']}, python {m['python']}; "
            f"torch {m['torch']}{', CUDA' if m['cuda'] else ''}; torch threads: "
            + (f"{m['threads_option']} in every torch benchmark (--threads)\n" if m.get("threads_option") else
               f"each script's own (tokenization, gpt_training, generation: torch's default {m['torch_threads']}; "
               f"epic_fm, streaming_memory: 1)\n") +
            f"load average at start {m['load_average'][0]:.2f}, at end {m['load_average_end'][0]:.2f} "
            f"(other jobs on this machine slow the wall-clock numbers)")


# --------------------------------------------------------------------------- command
def _write(path, size: str, machine: dict, runs: dict, skipped: list, complete: bool) -> list[dict]:
    machine["load_average_end"] = list(os.getloadavg())
    rows = summarise(runs)
    write_json(path, {"size": size, "complete": complete, "machine": machine, "summary": rows, "skipped": skipped,
                      "runs": {n: {k: r[k] for k in ("cmd", "returncode", "seconds", "json", "stdout", "stderr")}
                               for n, r in runs.items()}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="omnijet bench", description=__doc__.splitlines()[0],
                                 epilog=f"benchmarks: {', '.join(SUITE)}")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="smallest sizes (checks that the suite runs)")
    size.add_argument("--full", action="store_true", help="the scripts' largest (paper) sizes; about an hour")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    ap.add_argument("--json", default=str(BENCH_DIR / "results.json"), help="results file (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every torch benchmark (default: each script's own; 1 is the robust "
                         "choice on a machine shared with other jobs)")
    ap.add_argument("--bench-dir", default=str(BENCH_DIR), help=argparse.SUPPRESS)  # tests
    a = ap.parse_args(argv)
    bench_dir = Path(a.bench_dir)
    sz = "small" if a.small else "full" if a.full else "default"
    unknown = sorted(set(a.only or ()) - set(SUITE))
    if unknown:
        raise OmnijetError(f"--only: unknown benchmark {', '.join(unknown)} (known: {', '.join(SUITE)})")
    if a.threads is not None and a.threads <= 0:
        raise OmnijetError(f"--threads must be positive, got {a.threads}")
    if not bench_dir.is_dir():
        raise OmnijetError(f"{bench_dir}: benchmark scripts not found (run from a clone of the repository)")
    names = [n for n in SUITE if (a.only is None or n in a.only)]
    machine = machine_info()
    machine["threads_option"] = a.threads
    print(f"omnijet bench ({sz} sizes): {', '.join(names)}; results -> {a.json}", flush=True)
    runs, skipped = {}, []
    with tempfile.TemporaryDirectory(prefix="omnijet-bench-") as tmp:
        for name in names:
            if not (bench_dir / f"{name}.py").is_file():
                skipped.append(name)
                continue
            args = SUITE[name][sz] + (["--threads", str(a.threads)] if a.threads and name in THREADED else [])
            print(f"  {' '.join([name, *args])} ...", end=" ", flush=True)
            runs[name] = run_script(name, args, Path(tmp) / f"{name}.json", a.timeout, bench_dir)
            status = "ok" if runs[name]["returncode"] == 0 else f"FAILED ({runs[name]['returncode']})"
            print(f"{status} in {runs[name]['seconds']:.0f} s", flush=True)
            if runs[name]["returncode"] != 0:
                print("    " + "\n    ".join(runs[name]["stderr"].strip().splitlines()[-8:]), file=sys.stderr)
            _write(a.json, sz, machine, runs, skipped, complete=False)  # an interrupted suite keeps its results
    rows = _write(a.json, sz, machine, runs, skipped, complete=True)
    print()
    print(header(machine))
    print(format_table(rows))
    if skipped:
        print(f"skipped (script not present): {', '.join(skipped)}")
    print(f"wrote {a.json}")
    failed = [n for n, r in runs.items() if r["returncode"] != 0]
    return 1 if failed else 0

"""Peak memory of streaming tokenization (``omnijet tokenize``) at two data-set sizes.

The streaming path reads, tokenizes and writes one chunk at a time, so its peak RSS should not
depend on the number of jets; the in-memory path (``load_padded`` of every file, then
``tokenize``) is shown beside it for contrast and grows with the data. Each measurement runs in
a fresh process and reports that process's own peak RSS (VmHWM).

Input: JetClass-schema files of 20 000 jets each, made by repeating the real 500-jet sample
(``../shared``; toy jets when it is absent); ``--sizes 20000 80000`` means 1 and 4 files.
Tokenizer: a conditional VQ-VAE with K = 8192 (``--paper-size`` for the paper's encoder; the
model adds a constant to both columns). Untrained weights: memory and speed do not depend on them.

    .venv/bin/python benchmarks/streaming_memory.py [--sizes 20000 80000] [--chunk 10000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "jetclass_real_500.root"
PER_FILE = 20_000

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads({threads})
t0 = time.time()
mode, tok, files, out, chunk = {args!r}
if mode == "stream":
    from omnijet_lib.tokenizers.streaming import tokenize_files
    n = tokenize_files(tok, files, out, chunk=chunk, device="cpu")["jets"]
else:
    from omnijet_lib.data.loading import load_padded
    from omnijet_lib.tokenizers import load_tokenizer, tokenize
    x, mask, labels = load_padded(files)
    n = int((tokenize(load_tokenizer(tok), x, mask) >= 0).any(1).size)
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
print(json.dumps({{"jets": n, "peak_mb": peak, "seconds": time.time() - t0}}))
"""


def make_inputs(directory: Path, n_files: int) -> list[Path]:
    """``n_files`` files of PER_FILE jets (the real sample repeated, or toy jets)."""
    import awkward as ak
    import numpy as np

    from omnijet_lib.data.jetclass import make_jets, read_jetclass, write_jetclass

    if REAL.is_file():
        base = read_jetclass(REAL)
    else:
        rng = np.random.default_rng(0)
        counts = rng.integers(10, 80, 500)
        m = int(counts.sum())
        pt, eta, phi = rng.exponential(20.0, m) + 1, rng.normal(0, 0.2, m), rng.normal(0, 0.2, m)
        part = ak.zip({"px": pt * np.cos(phi), "py": pt * np.sin(phi), "pz": pt * np.sinh(eta),
                       "E": pt * np.cosh(eta)})
        base = make_jets(ak.unflatten(part, counts), rng.integers(0, 10, 500))
    jets = ak.concatenate([base] * (PER_FILE // len(base) + 1))[:PER_FILE]
    paths = []
    for i in range(n_files):
        p = directory / f"HToBB_{i:03d}.root"
        if not p.is_file():
            write_jetclass(p, jets)
        paths.append(p)
    return paths


def measure(mode: str, tok: Path, files: list[Path], out: Path, chunk: int, threads: int) -> dict:
    code = CHILD.format(threads=threads, args=(mode, str(tok), [str(f) for f in files], str(out), chunk))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000], help="jets (multiples of 20000)")
    ap.add_argument("--chunk", type=int, default=10_000, help="tree entries per chunk/shard")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paper-size", action="store_true", help="paper-size conditional encoder (slower)")
    ap.add_argument("--no-in-memory", action="store_true", help="skip the in-memory comparison")
    ap.add_argument("--workdir", help="keep inputs here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from omnijet_lib.tokenizers import VQVAE, VQVAEConfig, save_tokenizer

    with tempfile.TemporaryDirectory(prefix="omnijet_stream_") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        cfg = VQVAEConfig(num_codes=8192) if a.paper_size else \
            VQVAEConfig(num_codes=8192, hidden_dim=32, num_blocks=1, num_heads=4, mlp_hidden=32)
        tok = save_tokenizer(work / "tokenizer.safetensors", VQVAE(cfg))
        t0 = time.time()
        files = make_inputs(work, max(a.sizes) // PER_FILE)
        print(f"inputs: {len(files)} files x {PER_FILE} jets ({time.time() - t0:.0f} s to write); "
              f"chunk {a.chunk}; torch threads {a.threads}; tokenizer: conditional K=8192 "
              f"({'paper size' if a.paper_size else 'small encoder'})", flush=True)
        rows = []
        # the sizes at --chunk, then the largest size at 2 x --chunk: the peak follows the chunk
        runs = [(n, a.chunk) for n in a.sizes] + [(max(a.sizes), 2 * a.chunk)]
        for n, chunk in runs:
            fs = files[: max(n // PER_FILE, 1)]
            out = work / f"shards_{n}_{chunk}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume
            stream = measure("stream", tok, fs, out, chunk, a.threads)
            row = {"jets": stream["jets"], "files": len(fs), "chunk": chunk, "stream_peak_mb": round(stream["peak_mb"]),
                   "stream_jets_per_s": round(stream["jets"] / stream["seconds"])}
            if not a.no_in_memory and chunk == a.chunk:
                row["in_memory_peak_mb"] = round(measure("memory", tok, fs, work, chunk, a.threads)["peak_mb"])
            rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n| jets | files | chunk | streaming peak RSS (MB) | streaming jets/s | in-memory peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['jets']} | {r['files']} | {r['chunk']} | {r['stream_peak_mb']} | {r['stream_jets_per_s']} | "
              f"{r.get('in_memory_peak_mb', '-')} |")
    lo, hi = rows[0], rows[len(a.sizes) - 1]
    growth = hi["stream_peak_mb"] / lo["stream_peak_mb"]
    verdict = "flat" if growth < 1.15 else "NOT flat"
    print(f"\nstreaming peak RSS x{growth:.2f} for x{hi['jets'] / lo['jets']:.0f} jets at chunk {a.chunk}: {verdict}"
          + (f"; in-memory x{hi['in_memory_peak_mb'] / lo['in_memory_peak_mb']:.2f}" if "in_memory_peak_mb" in hi else "")
          + f"; chunk x2 -> peak x{rows[-1]['stream_peak_mb'] / hi['stream_peak_mb']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if growth < 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())

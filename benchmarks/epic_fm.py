"""EPiC-FM speed: training and sampling jets/s for the light and JetClass configurations.

    python benchmarks/epic_fm.py            # default sizes (a few minutes on 2 CPU cores)
    python benchmarks/epic_fm.py --small    # smoke-test sizes (seconds)
    python benchmarks/epic_fm.py --json out.json

Each case runs in its own subprocess so its peak RSS is its own. Jets are synthetic with a
JetClass-like multiplicity (Poisson, mean 40, 5-128 constituents); batches are bucketed and
trimmed as in training. Training = forward + backward + AdamW + EMA update on the bare module
(no Trainer overhead). Sampling = :func:`omnijet_lib.training.epic_fm.sample` with the
midpoint solver; cost is linear in the number of ODE steps, so when fewer than 100 steps are
run the 100-step rate is also given (rate × steps / 100). Median of ``--repeats`` repeats.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # (config, mode): dict of sizes; "default" and "small"
    "default": {
        ("light", "train"): dict(batch=256, steps=3),
        ("light", "sample"): dict(batch=128, n_jets=512, ode_steps=20),
        ("jetclass", "train"): dict(batch=256, steps=1),
        ("jetclass", "sample"): dict(batch=128, n_jets=256, ode_steps=2),
    },
    "small": {
        ("light", "train"): dict(batch=64, steps=2),
        ("light", "sample"): dict(batch=32, n_jets=32, ode_steps=4),
        ("jetclass", "train"): dict(batch=16, steps=1),
        ("jetclass", "sample"): dict(batch=16, n_jets=16, ode_steps=1),
    },
}


def synthetic_jets(n: int, seed: int = 0, max_len: int = 128):
    import numpy as np

    rng = np.random.default_rng(seed)
    mult = np.clip(rng.poisson(40, n), 5, max_len)
    mask = np.arange(max_len)[None] < mult[:, None]
    x = (rng.normal(size=(n, max_len, 3)) * [1.0, 0.5, 0.5] + [1.0, 0.0, 0.0]).astype(np.float32)
    x[~mask] = 0
    labels = rng.integers(0, 10, n)
    jet_pt = rng.uniform(500, 1000, n).astype(np.float32)
    jet_eta = rng.uniform(-2, 2, n).astype(np.float32)
    return x, mask, labels, jet_pt, jet_eta


def run_case(config: str, mode: str, sizes: dict, repeats: int, threads: int) -> dict:
    """One benchmark case in this process; returns a result row."""
    import numpy as np
    import torch

    from omnijet_lib.models.epic_fm import EPiCConfig
    from omnijet_lib.training import PaddedDataset, make_loader
    from omnijet_lib.training.epic_fm import EPiCFlowMatching, sample

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = getattr(EPiCConfig, config)()
    data = synthetic_jets(max(4 * sizes["batch"], 2048))
    module = EPiCFlowMatching(cfg)
    module.fit_statistics(*data)
    row = dict(config=config, mode=mode, params=sum(p.numel() for p in module.net.parameters()),
               threads=threads, torch=torch.__version__, **sizes)
    times = []
    if mode == "train":
        x, mask, labels, jet_pt, jet_eta = data
        loader = make_loader(PaddedDataset(x, mask, label=labels, jet_pt=jet_pt, jet_eta=jet_eta),
                             sizes["batch"], drop_last=True)
        def forever():
            while True:
                yield from loader

        batches = forever()
        opt = module.configure_optimizers()

        def step():
            batch = next(batches)
            opt.zero_grad(set_to_none=True)
            module._loss(batch).backward()
            opt.step()
            module.update_ema()
            return len(batch["x"])

        step()  # warm-up (allocator, lazy init)
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = sum(step() for _ in range(sizes["steps"]))
            times.append(n / (time.perf_counter() - t0))
        row["jets_per_s"] = statistics.median(times)
        row["s_per_step"] = sizes["batch"] / row["jets_per_s"]
    else:
        gen = torch.Generator().manual_seed(0)
        sample(module, min(8, sizes["n_jets"]), steps=1, batch_size=sizes["batch"], generator=gen)  # warm-up
        for _ in range(repeats):
            stats = {}
            sample(module, sizes["n_jets"], steps=sizes["ode_steps"], batch_size=sizes["batch"], generator=gen,
                   stats=stats)
            times.append(stats["jets_per_s"])
        row["jets_per_s"] = statistics.median(times)
        row["jets_per_s_100_steps"] = row["jets_per_s"] * sizes["ode_steps"] / 100
    row["repeats"] = times
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def run(small: bool = False, repeats: int = 3, threads: int = 1, configs=("light", "jetclass")) -> list[dict]:
    """Every case in a fresh subprocess; returns the result rows."""
    rows = []
    for (config, mode), sizes in SIZES["small" if small else "default"].items():
        if config not in configs:
            continue
        cmd = [sys.executable, __file__, "--one", config, mode, json.dumps(sizes),
               "--repeats", str(repeats), "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if out.returncode != 0:
            raise RuntimeError(f"benchmark {config}/{mode} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'config':9} {'mode':7} {'params':>9} {'batch':>6} {'steps':>6} {'jets/s':>9} "
          f"{'@100 steps':>10} {'s/step':>8} {'peak RSS':>9}")
    for r in rows:
        steps = r.get("steps", r.get("ode_steps"))
        at100 = f"{r['jets_per_s_100_steps']:.3g}" if "jets_per_s_100_steps" in r else "-"
        sps = f"{r['s_per_step']:.2f}" if "s_per_step" in r else "-"
        print(f"{r['config']:9} {r['mode']:7} {r['params']:>9,} {r['batch']:>6} {steps:>6} {r['jets_per_s']:>9.3g} "
              f"{at100:>10} {sps:>8} {r['peak_rss_mb']:>7.0f}MB")
    if rows:
        print(f"torch {rows[0]['torch']}, {rows[0]['threads']} threads, median of {len(rows[0]['repeats'])} repeats")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="smoke-test sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine 2 threads can be >10x slower)")
    ap.add_argument("--configs", default="light,jetclass")
    ap.add_argument("--json", help="write the result rows (and a summary) here")
    ap.add_argument("--one", nargs=3, metavar=("CONFIG", "MODE", "SIZES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        config, mode, sizes = args.one
        print(json.dumps(run_case(config, mode, json.loads(sizes), args.repeats, args.threads)))
        return
    rows = run(args.small, args.repeats, args.threads, tuple(args.configs.split(",")))
    print_table(rows)
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from omnijet_lib.io import write_json

        write_json(args.json, {"rows": rows, "summary": summary(rows)})


def summary(rows: list[dict]) -> list[dict]:
    """Uniform rows for ``omnijet bench``: EPiC-FM has no reference method here, so no ratio."""
    out = []
    for r in rows:
        what = (f"batch {r['batch']}, {r['steps']} steps" if r["mode"] == "train" else
                f"{r['n_jets']} jets, {r['ode_steps']} ODE steps; {r['jets_per_s_100_steps']:.3g} jets/s at 100 steps")
        out.append({"benchmark": f"EPiC-FM {r['config']} {r['mode']}", "ours": r["jets_per_s"], "reference": None,
                    "unit": "jets/s", "ratio": None, "target": "report", "met": None, "peak_rss_mb": r["peak_rss_mb"],
                    "note": f"{what}; {r['threads']} thread(s), median of {len(r['repeats'])}"})
    return out


if __name__ == "__main__":
    main()

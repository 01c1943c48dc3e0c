"""Simulation speed: accepted jets/s per class and the share of wall time outside Pythia's ``next()``.

For every class, one sub-chunk of ``--jets`` jets is simulated in this process exactly as
``simulate_dataset`` does it (``nextBatch`` + detector + clustering + matching + N-subjettiness)
and written to a ROOT file; then the same Pythia is re-seeded with the same chunk seed and
``Pythia.next()`` alone is called for the same number of events -- the identical events, so the
difference is everything we add (awkward export, detector, FastJet, matching, tau_N, writing).
Each timing is the fastest of ``--repeats`` runs. Pythia's initialisation (once per class and
worker) is reported separately.

Then the same small dataset is simulated with 1 and with 2 worker processes (wall time,
process start-up included) for the scaling ratio.

    python benchmarks/simulation.py                   # 100 jets per class x 3, scaling on all 10 classes
    python benchmarks/simulation.py --jets 30 --repeats 1 --scaling-jets 40   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnijet_lib import simulation as S  # noqa: E402
from omnijet_lib.data.jetclass import CLASS_LABELS, write_jetclass  # noqa: E402


def per_class(n_jets: int, seed: int = 1, classes=None, repeats: int = 3) -> list[dict]:
    """Per class: the fastest of ``repeats`` runs of our pipeline and of bare ``next()`` on the
    same events, in CPU seconds of this single-threaded process (= wall seconds on an idle core;
    unlike wall time it is not inflated by other processes sharing the core). Wall times are
    recorded too."""
    cfg = S.SimulationConfig(seed=seed, chunk_jets=n_jets, jets_per_file=n_jets)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in classes if classes is not None else range(len(CLASS_LABELS)):
            t0 = time.perf_counter()
            S._pythia(cfg, label)  # initialise (once per class and worker in real runs)
            t_init = time.perf_counter() - t0
            t_ours, t_next, w_ours, w_next = [], [], [], []
            for _ in range(repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                res = S._simulate_chunk((cfg, label, 1, n_jets))
                write_jetclass(Path(tmp) / "bench.root", S._chunks_to_jets([res], label))
                t_ours.append(time.process_time() - c0)
                w_ours.append(time.perf_counter() - t0)
                py = S._STATE["pythia"]  # same instance, same chunk seed -> the same events
                py.rndm.init(S._pythia_seed(S._seed_sequence(cfg, label, 1, 1)))
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(res["n_events"]):
                    py.next()
                t_next.append(time.process_time() - c0)
                w_next.append(time.perf_counter() - t0)
            ours, nxt = min(t_ours), min(t_next)
            rows.append({
                "class": CLASS_LABELS[label], "jets": n_jets, "events": res["n_events"],
                "jets_per_s": n_jets / ours, "pythia_next_s": nxt, "total_s": ours,
                "outside_next": 1 - nxt / ours, "init_s": t_init, "repeats": repeats,
                "wall_total_s": min(w_ours), "wall_next_s": min(w_next),
                "outside_next_wall": 1 - min(w_next) / min(w_ours),
            })
            print(f"{rows[-1]['class']:5s} {n_jets:5d} jets {res['n_events']:5d} events  "
                  f"{rows[-1]['jets_per_s']:6.1f} jets/s  next() {nxt:6.2f} s of {ours:6.2f} s  "
                  f"outside next(): {100 * rows[-1]['outside_next']:4.1f}%  [wall: "
                  f"{100 * rows[-1]['outside_next_wall']:5.1f}%]  (init {t_init:.2f} s)", flush=True)
    return rows


def scaling(n_jets: int, classes, seed: int = 1) -> dict:
    """Wall time of the same dataset with 1 and 2 worker processes (start-up included) and how
    many cores the workers kept busy (their CPU seconds / wall seconds). On a machine shared with
    other jobs the wall ratio understates the scaling, so the CPU-bound ratio is printed too:
    CPU seconds of the 1-worker run / CPU seconds of the busiest of the 2 workers, i.e. the
    speed-up on two otherwise idle cores if start-up is negligible."""
    cfg = S.SimulationConfig()  # default chunks: one task per class at these sizes, as in ci
    run = {}
    for workers in (1, 2):
        S._STATE.clear()
        with tempfile.TemporaryDirectory() as tmp:
            S.simulate_dataset(tmp, n_jets, seed=seed, workers=workers, classes=classes, progress=False,
                               config=cfg)
        run[workers] = dict(S.LAST_RUN)
    total = n_jets * len(classes)
    w1, w2 = run[1]["wall_s"], run[2]["wall_s"]
    res = {"jets": total, "wall_1": w1, "wall_2": w2, "ratio": w1 / w2,
           "jets_per_s_1": total / w1, "jets_per_s_2": total / w2,
           "cores_busy_1": run[1]["cores_busy"], "cores_busy_2": run[2]["cores_busy"],
           "cpu_1": run[1]["worker_cpu_s"], "cpu_2": run[2]["worker_cpu_s"],
           "busiest_worker_cpu_2": run[2]["busiest_worker_cpu_s"],
           "cpu_bound_ratio": run[1]["worker_cpu_s"] / run[2]["busiest_worker_cpu_s"]}
    print(f"scaling: {total} jets, 1 worker {w1:.1f} s ({res['jets_per_s_1']:.1f} jets/s, "
          f"{res['cores_busy_1']:.2f} cores busy), 2 workers {w2:.1f} s ({res['jets_per_s_2']:.1f} jets/s, "
          f"{res['cores_busy_2']:.2f} cores busy): wall ratio {res['ratio']:.2f}x (target >= 1.8x)\n"
          f"         CPU s: 1 worker {res['cpu_1']:.1f}, 2 workers {res['cpu_2']:.1f} "
          f"(busiest {res['busiest_worker_cpu_2']:.1f}): CPU-bound ratio {res['cpu_bound_ratio']:.2f}x",
          flush=True)
    return res


def summary(rows: list[dict], sc: dict | None) -> list[dict]:
    """Uniform rows for ``omnijet bench``: our pipeline vs Pythia's ``next()`` alone (CPU time, all
    classes; ratio = ours / next(), so 0.8 means 20% of the time is spent outside Pythia)."""
    jets = sum(r["jets"] for r in rows)
    tot, nxt = sum(r["total_s"] for r in rows), sum(r["pythia_next_s"] for r in rows)
    worst = max(rows, key=lambda r: r["outside_next"])
    out = [{"benchmark": f"simulation, {len(rows)} classes (per core)", "ours": jets / tot, "reference": jets / nxt,
            "unit": "jets/s", "ratio": nxt / tot, "target": ">= 0.8x (<= 20% outside Pythia)",
            "met": 1 - nxt / tot <= 0.2,
            "note": f"reference = Pythia next() alone on the same events; {100 * (1 - nxt / tot):.0f}% outside "
                    f"(worst {worst['class']} {100 * worst['outside_next']:.0f}%); CPU time, fastest of "
                    f"{rows[0]['repeats']}"}]
    if sc:
        out.append({"benchmark": "simulation, 2 vs 1 workers", "ours": sc["jets_per_s_2"],
                    "reference": sc["jets_per_s_1"], "unit": "jets/s", "ratio": sc["ratio"], "target": ">= 1.8x",
                    "met": sc["ratio"] >= 1.8,
                    "note": f"wall time, one run each; CPU-bound ratio {sc['cpu_bound_ratio']:.2f}x"})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jets", type=int, default=100, help="jets per class for the per-class table")
    ap.add_argument("--repeats", type=int, default=3, help="per-class timings: fastest of this many")
    ap.add_argument("--scaling-jets", type=int, default=200, help="jets per class for the 1-vs-2 workers run")
    ap.add_argument("--scaling-classes", nargs="*", default=list(CLASS_LABELS))
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1-vs-2 workers run")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    rows = per_class(a.jets, repeats=a.repeats)
    tot = sum(r["total_s"] for r in rows)
    nxt = sum(r["pythia_next_s"] for r in rows)
    wtot = sum(r["wall_total_s"] for r in rows)
    wnxt = sum(r["wall_next_s"] for r in rows)
    print(f"all classes: {sum(r['jets'] for r in rows) / tot:.1f} jets/s per core, "
          f"outside next(): {100 * (1 - nxt / tot):.1f}% of CPU time (target <= 20%), "
          f"{100 * (1 - wnxt / wtot):.1f}% of wall time")
    sc = None if a.no_scaling else scaling(a.scaling_jets, [S.class_index(c) for c in a.scaling_classes])
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    result = {"per_class": rows, "outside_next_all": 1 - nxt / tot,
              "outside_next_all_wall": 1 - wnxt / wtot, "scaling": sc, "summary": summary(rows, sc)}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

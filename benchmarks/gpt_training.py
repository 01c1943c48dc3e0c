"""GPT training speed: length-bucketed, trimmed batches with the head on real positions only
(``GPT.loss``) vs every batch padded to 130 positions with the head on all of them.

Paper-size model (vocabulary 8194), AdamW, synthetic token sequences with a JetClass-like
multiplicity (mean ~40, 2..128 constituents). Each variant runs in a fresh subprocess (its own
peak RSS), one warm-up step, then one timed epoch. A padded step costs the same whatever the
jets, so it is timed on a few batches; the trimmed variant needs an epoch of many batches for
the bucketing to show (the sampler sorts pools of up to 50 batches; fewer batches here give
coarser buckets, i.e. a conservative ratio).

    python benchmarks/gpt_training.py            # batch 256: 16 trimmed, 3 padded batches
    python benchmarks/gpt_training.py --small    # batch 32: 12 trimmed, 2 padded batches
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_sequences(n: int, seed: int = 0, vocab: int = 8194, max_len: int = 130):
    """Tokenizer-like sequences: start 0, random codes+1, stop, zero padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_const = np.clip(np.round(rng.gamma(4.0, 10.0, n)), 2, max_len - 2).astype(int)  # mean ~40
    seq = rng.integers(1, vocab - 1, (n, max_len))
    seq[:, 0] = 0
    seq[np.arange(n), n_const + 1] = vocab - 1
    mask = np.arange(max_len)[None] <= (n_const + 1)[:, None]
    return np.where(mask, seq, 0), mask


def padded_loss(model, seq, mask):
    """The naive loss: head on every one of the 129 positions, padding ignored afterwards."""
    import torch.nn.functional as F

    logits = model(seq[:, :-1])  # (B, 129, V)
    tgt = seq[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


def worker(variant: str, batch: int, n_batches: int, threads: int, seed: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from omnijet_lib.models.gpt import GPT, GPTConfig
    from omnijet_lib.training import PaddedDataset, make_loader

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT(GPTConfig()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seq, mask = make_sequences(batch * (n_batches + 1), seed)
    warm, data = slice(0, batch), slice(batch, None)
    trimmed = variant == "trimmed"
    loss_fn = model.loss if trimmed else (lambda s, m: padded_loss(model, s, m))

    def step(b):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(b["x"], b["mask"])
        loss.backward()
        opt.step()
        return float(loss)

    for b in make_loader(PaddedDataset(seq[warm], mask[warm]), batch, seed=seed, bucket=trimmed):
        step(b)
    loader = make_loader(PaddedDataset(seq[data], mask[data]), batch, seed=seed, bucket=trimmed)
    lengths, t0, c0 = [], time.perf_counter(), time.process_time()
    for b in loader:
        step(b)
        lengths.append(b["x"].shape[1])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(seq[data])
    return {"variant": variant, "batch": batch, "jets": n, "seconds": dt, "jets_per_s": n / dt,
            "cpu_seconds": cpu, "jets_per_cpu_s": n / cpu,
            "mean_batch_length": sum(lengths) / len(lengths), "mean_sequence_length": float(mask[data].sum(1).mean()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="batch 32, fewer timed batches")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--batches", type=int, nargs=2, default=None, metavar=("TRIMMED", "PADDED"),
                   help="timed batches per variant")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="write the results here")
    p.add_argument("--worker", choices=["trimmed", "padded"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch = args.batch or (32 if args.small else 256)
    n_batches = dict(zip(("trimmed", "padded"), args.batches or ((12, 2) if args.small else (16, 3))))
    if args.worker:
        print(json.dumps(worker(args.worker, batch, n_batches[args.worker], args.threads, args.seed)))
        return {}

    res = {}
    for variant in ("trimmed", "padded"):
        cmd = [sys.executable, __file__, "--worker", variant, "--batch", str(batch),
               "--batches", str(n_batches["trimmed"]), str(n_batches["padded"]),
               "--threads", str(args.threads), "--seed", str(args.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    t, pd = res["trimmed"], res["padded"]
    ratio = t["jets_per_s"] / pd["jets_per_s"]
    ratio_cpu = t["jets_per_cpu_s"] / pd["jets_per_cpu_s"]
    print(f"GPT training, paper size (vocab 8194), batch {batch}, threads={t['threads']}, "
          f"mean sequence length {t['mean_sequence_length']:.1f}")
    print(f"{'variant':>8} {'jets/s':>8} {'jets/CPU-s':>11} {'batch length':>13} {'peak RSS MB':>12}")
    for r in (t, pd):
        print(f"{r['variant']:>8} {r['jets_per_s']:>8.1f} {r['jets_per_cpu_s']:>11.1f} "
              f"{r['mean_batch_length']:>13.1f} {r['peak_rss_mb']:>12.0f}")
    print(f"ratio trimmed/padded: {ratio:.1f}x wall clock, {ratio_cpu:.1f}x CPU time")
    summary = [{"benchmark": f"GPT training, batch {batch}", "ours": t["jets_per_s"], "reference": pd["jets_per_s"],
                "unit": "jets/s", "ratio": ratio, "target": ">= 4x", "met": ratio >= 4,
                "peak_rss_mb": t["peak_rss_mb"],
                "note": f"vs padded-130 batches; one timed epoch each (not a median); CPU-time ratio {ratio_cpu:.1f}x"}]
    result = {"benchmark": "gpt_training", "batch": batch, "trimmed": t, "padded": pd, "ratio": ratio,
              "ratio_cpu": ratio_cpu, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

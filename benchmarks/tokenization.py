"""Tokenization and VQ-VAE training throughput: bucketed/trimmed/chunked vs naive, same model, one run.

* fast path: jets sorted into length buckets, each batch trimmed to its longest jet, the
  quantizer searches only real latents in fixed-size chunks (library code: ``tokenize``,
  ``make_loader``, ``VectorQuantizer``);
* naive path (the reference implementation's way): every batch padded to all 128 slots, every
  slot quantized against the full codebook at once (one (B·128, K) distance matrix); for
  training, the same model and loss on padded-128 batches with the un-chunked search (over the
  real latents, so that both paths optimise exactly the same objective).

Model: conditional VQ-VAE at paper size (NormFormer, 4+4 blocks, 128 hidden), K = 8192,
k-means initialised once and shared by both paths. Data: the real 500-jet JetClass sample
(``../shared``) repeated, or toy jets with a similar length spectrum when it is absent.

    .venv/bin/python benchmarks/tokenization.py [--small] [--threads N] [--json out.json]

Each measurement runs in its own (spawned) process so that its peak RSS is its own. On 2 CPU
cores the naive training step at batch 512 takes ~40-50 s and ~10 GB; use ``--train-steps 1
--warmup 0`` for a run of about two minutes.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omnijet_lib.tokenizers import VQVAE, VQVAEConfig, nearest_code, save_tokenizer, tokenize  # noqa: E402
from omnijet_lib.training.batching import PaddedDataset, make_loader  # noqa: E402
from omnijet_lib.training.vqvae import VQVAEModule  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "jetclass_real_500.root"


# --------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """Peak memory of this process so far: the CUDA allocator's peak, else the peak RSS (VmHWM;
    unlike ru_maxrss it does not inherit the parent's peak across fork/exec)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _base() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else _rss()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- data
def load_features(n_jets: int, seed: int = 0):
    """(x (n, 128, 3), mask (n, 128), source) — the real sample repeated, or toy jets."""
    if REAL.is_file():
        from omnijet_lib.data import constituent_features, read_jetclass, to_padded

        x, mask = to_padded(constituent_features(read_jetclass(REAL)))
        reps = -(-n_jets // len(x))
        return np.tile(x, (reps, 1, 1))[:n_jets], np.tile(mask, (reps, 1))[:n_jets], f"{REAL.name} ×{reps}"
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.gamma(4.0, 10.0, n_jets).astype(int), 5, 128)  # mean ~40 like JetClass
    mask = np.arange(128)[None] < lengths[:, None]
    x = rng.normal(0, 1, (n_jets, 128, 3)).astype(np.float32) * mask[..., None]
    return x, mask, "toy jets (../shared absent)"


# --------------------------------------------------------------------------- tokenization
@torch.no_grad()
def naive_tokenize(model: VQVAE, x, mask, batch_size: int) -> np.ndarray:
    """All 128 slots through the encoder, all slots searched against the full codebook at once."""
    dev = next(model.parameters()).device
    model.eval()
    codes = model.vq.effective_codebook()
    out = np.empty(mask.shape, np.int64)
    for s in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[s:s + batch_size]).to(dev)
        mb = torch.from_numpy(mask[s:s + batch_size]).to(dev)
        z = model.encoder(xb, mb)                                        # (B, 128, 4)
        idx = nearest_code(z.reshape(-1, z.shape[-1]), codes, chunk_elements=None).view(mb.shape)
        out[s:s + batch_size] = idx.masked_fill(~mb, -1).cpu().numpy()
    return out


def bench_tokenization(model, x, mask, batch_size, device, repeats, naive: bool):
    fn = (lambda: naive_tokenize(model, x, mask, batch_size)) if naive else \
        (lambda: tokenize(model, x, mask, batch_size=batch_size))
    base = _base()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tokens = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return dict(jets_per_s=len(x) / float(np.median(times)), peak_mb=_peak() / 2**20,
                extra_mb=(_peak() - base) / 2**20, tokens=tokens)


# --------------------------------------------------------------------------- training
def bench_training(model, x, mask, batch_size, steps, device, naive: bool, warmup: int = 1, seed=0):
    model = model.to(device).train()
    if naive:
        model.vq.chunk_elements = None  # one (N, K) distance matrix per batch
    module = VQVAEModule(model)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=1e-2)
    loader = make_loader(PaddedDataset(x, mask), batch_size, shuffle=True, seed=seed, bucket=not naive,
                         drop_last=True)
    # naive: `steps` padded batches; fast: a whole epoch of buckets (short and long alike), so
    # that its mean batch length is representative
    batches = list(loader)[: (steps + warmup) if naive else None]
    steps = len(batches) - warmup
    lengths = [int(b["x"].shape[1]) for b in batches[warmup:]]

    def step(b):
        b = {k: v.to(device) for k, v in b.items()}
        loss, _, _ = module.losses(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    base = _base()
    for b in batches[:warmup]:  # warm-up (allocator, kernels): counts for memory, not for time
        step(b)
    _sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    _sync(device)
    dt = time.perf_counter() - t0
    return dict(jets_per_s=steps * batch_size / dt, s_per_step=dt / steps, steps=steps, peak_mb=_peak() / 2**20,
                extra_mb=(_peak() - base) / 2**20, mean_len=float(np.mean(lengths)))


def _worker(task: str, naive: bool, tmp: str, args: dict) -> dict:
    """One measurement in a fresh process, so that its peak memory is its own."""
    from omnijet_lib.tokenizers import load_tokenizer

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_tokenizer(Path(tmp) / "model.safetensors", device=device)
    data = np.load(Path(tmp) / "data.npz")
    x, mask = data["x"], data["mask"]
    if task == "tokenize":
        n = args["jets"]
        return bench_tokenization(model, x[:n], mask[:n], args["batch_size"], device, args["repeats"], naive)
    n = args["train_jets"]
    return bench_training(model, x[:n], mask[:n], args["train_batch_size"], args["train_steps"], device, naive,
                          args["warmup"])


def _run(task, naive, tmp, args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
        return ex.submit(_worker, task, naive, tmp, args).result()


# --------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="quick run (fewer jets, smaller training batch)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--codes", type=int, default=8192)
    p.add_argument("--attn-dropout", type=float, default=0.1,
                   help="dropout on attention weights (paper 0.1; 0 enables the fused attention kernel)")
    p.add_argument("--jets", type=int, default=None, help="jets to tokenize (default 4096, small 512)")
    p.add_argument("--batch-size", type=int, default=None, help="tokenization batch (default 512, small 128)")
    p.add_argument("--train-batch-size", type=int, default=None, help="default 512, small 32")
    p.add_argument("--train-steps", type=int, default=None, help="timed naive steps (default 3, small 1)")
    p.add_argument("--repeats", type=int, default=None, help="tokenization repeats, median (default 3, small 1)")
    p.add_argument("--train-jets", type=int, default=None, help="jets for the fast epoch (default 8 batches)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per path")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-tokenization", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_jets = args.jets or (512 if args.small else 4096)
    train_bs = args.train_batch_size or (32 if args.small else 512)
    steps = args.train_steps or (1 if args.small else 3)
    repeats = args.repeats or (1 if args.small else 3)
    args.batch_size = args.batch_size or (128 if args.small else 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    train_jets = args.train_jets or 8 * train_bs
    x, mask, source = load_features(max(n_jets, train_jets, (steps + args.warmup) * train_bs))
    print(f"torch {torch.__version__}, device {device}, threads {args.threads or torch.get_num_threads()}; "
          f"data: {source}; mean constituents {mask.sum(1).mean():.1f}; each measurement in its own process")
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(num_codes=args.codes, attn_dropout=args.attn_dropout))
    with torch.no_grad():  # k-means initialise once, shared by both paths
        model.train()(torch.from_numpy(x[:512]), torch.from_numpy(mask[:512]))
    wargs = dict(threads=args.threads, jets=n_jets, batch_size=args.batch_size, repeats=repeats,
                 train_batch_size=train_bs, train_steps=steps, train_jets=train_jets, warmup=args.warmup,
                 attn_dropout=args.attn_dropout)
    mem = "GPU allocator peak" if device == "cuda" else "peak RSS"
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(Path(tmp) / "model.safetensors", model.eval())
        np.savez(Path(tmp) / "data.npz", x=x, mask=mask)
        if not args.skip_tokenization:
            result.update(report_tokenization(tmp, wargs, mask[:n_jets], args.codes, mem))
        if not args.skip_training:
            result.update(report_training(tmp, wargs, train_jets, args.codes, mem))
    result["settings"] = {"torch": torch.__version__, "device": device, "data": source, **wargs,
                          "threads": args.threads or torch.get_num_threads(), "codes": args.codes}
    result["summary"] = summary(result)
    if args.json:
        from omnijet_lib.io import write_json

        write_json(args.json, result)
    return result


def summary(result: dict) -> list[dict]:
    """Uniform rows for ``omnijet bench`` (ratio = fast / naive jets/s)."""
    st, rows = result["settings"], []
    if "tokenization" in result:
        f, n = result["tokenization"]["fast"], result["tokenization"]["naive"]
        rows.append({"benchmark": f"VQ-VAE tokenization, K={st['codes']}", "ours": f["jets_per_s"],
                     "reference": n["jets_per_s"], "unit": "jets/s", "ratio": result["tokenization_speedup"],
                     "target": ">= 3x", "met": result["tokenization_speedup"] >= 3, "peak_rss_mb": f["peak_mb"],
                     "note": f"vs all-128-slots + full-codebook search; batch {st['batch_size']}, median of "
                             f"{st['repeats']}; extra memory {f['extra_mb']:.0f} vs {n['extra_mb']:.0f} MB"})
    if "training" in result:
        f, n = result["training"]["fast"], result["training"]["naive"]
        rows.append({"benchmark": f"VQ-VAE training, K={st['codes']}", "ours": f["jets_per_s"],
                     "reference": n["jets_per_s"], "unit": "jets/s", "ratio": result["training_speedup"],
                     "target": ">= 8x", "met": result["training_speedup"] >= 8, "peak_rss_mb": f["peak_mb"],
                     "note": f"vs padded-128 batches; batch {st['train_batch_size']}; fast: one epoch of {f['steps']} "
                             f"steps, naive: {n['steps']} steps (total time, not a median)"})
    return rows


def report_tokenization(tmp, wargs, mask, codes, mem) -> dict:
    rows = {name: _run("tokenize", name == "naive", tmp, wargs) for name in ("naive", "fast")}
    n, f = rows["naive"], rows["fast"]
    agree = float((f["tokens"] == n["tokens"])[mask].mean())
    print(f"\ntokenization, conditional VQ-VAE K={codes}, {len(mask)} jets, batch {wargs['batch_size']}, "
          f"median of {wargs['repeats']}")
    for name, r in (("naive (128 slots, full codebook)  ", n), ("fast  (bucketed, trimmed, chunked)", f)):
        print(f"  {name}: {r['jets_per_s']:8.1f} jets/s   {mem} {r['peak_mb']:7.0f} MB "
              f"(+{r['extra_mb']:.0f} MB while running)")
    ratio = f["jets_per_s"] / n["jets_per_s"]
    print(f"  speed-up {ratio:.1f}x (target >= 5x); identical tokens {100 * agree:.2f}%")
    return {"tokenization": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()},
            "tokenization_speedup": ratio, "token_agreement": agree}


def report_training(tmp, wargs, n_jets, codes, mem) -> dict:
    tr = {name: _run("train", name == "naive", tmp, wargs) for name in ("naive", "fast")}
    n, f = tr["naive"], tr["fast"]
    print(f"\ntraining step (forward+backward+AdamW), K={codes}, batch {wargs['train_batch_size']}, {n_jets} jets, "
          f"attention dropout {wargs['attn_dropout']}; "
          f"naive: {wargs['train_steps']} timed step(s), fast: one epoch; {wargs['warmup']} warm-up step(s)")
    for name, r in (("naive (padded 128, full codebook) ", n), ("fast  (bucketed, trimmed, chunked)", f)):
        print(f"  {name}: {r['jets_per_s']:8.1f} jets/s  {r['s_per_step']:6.2f} s/step  {mem} "
              f"{r['peak_mb']:7.0f} MB (+{r['extra_mb']:.0f} MB)  mean batch length {r['mean_len']:.0f}, "
              f"{r['steps']} steps")
    ratio = f["jets_per_s"] / n["jets_per_s"]
    print(f"  speed-up {ratio:.1f}x (target >= 8x)")
    return {"training": tr, "training_speedup": ratio}


if __name__ == "__main__":
    main()

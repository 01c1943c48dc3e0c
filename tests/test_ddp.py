"""Distributed training: a real 2-process DDP job on CPU (gloo) against a single-process run.

The worker script below runs in subprocesses (Lightning's ``ddp`` launcher re-executes it for
rank 1), so the test process never initialises torch.distributed. Design: 32 jets of equal
length, global batch 32. Single process: batch 32; DDP: batch 16 per rank, and the rank-aware
bucketed sampler gives rank 0 and rank 1 the two halves of the same global batch, so every step
sees the same 32 jets and the averaged gradient equals the single-process one.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

WORKER = r'''
import json, os, sys
import numpy as np, torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from omnijet_lib.training.fit import TrainConfig, fit

out, devices = sys.argv[1], int(sys.argv[2])
batch = 32 // devices
rank = int(os.environ.get("LOCAL_RANK", 0))
cfg = TrainConfig(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                  progress_bar=False, log_every_n_steps=1)
N, L, n = 32, 16, 12
res = {}

def save(name, model):
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, f"{name}_rank{rank}.safetensors"))

# ---- VQ-VAE: "vq" (dropout, k-means and dead-code replacement off: comparable to 1 process),
#      "vq_sync" (k-means init + replacement every 2 idle steps: the quantizer's rank sync)
from omnijet_lib.training.vqvae import VQVAEModule, make_tokenizer, train_tokenizer
rng = np.random.default_rng(0)
x = rng.normal(size=(N, L, 3)).astype(np.float32)
mask = np.zeros((N, L), bool); mask[:, :n] = True
x[~mask] = 0
kw = dict(hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16, dropout=0.0, attn_dropout=0.0)
for name, sync in (("vq_sync", True), ("vq", False)):
    mkw = dict(kw, kmeans_init=sync, replace_freq=2 if sync else 1000)
    torch.manual_seed(0)
    save(name + "_init", make_tokenizer("conditional", 16, **mkw))
    tok = train_tokenizer("conditional", x, mask, num_codes=16, epochs=3, batch_size=batch,
                          out_dir=os.path.join(out, name), train_config=cfg, seed=0, val_fraction=0.0, **mkw)
    tok = tok.cpu().eval()
    save(name, tok)
    with torch.no_grad():
        res[name] = VQVAEModule(tok).losses({"x": torch.from_numpy(x), "mask": torch.from_numpy(mask)})[0].item()

# ---- GPT on padded sequences
from omnijet_lib.models.gpt import GPT, GPTConfig
from omnijet_lib.training.gpt import GPTModule, train_gpt
K = 20
seq = np.full((N, n + 2), K + 1, np.int64); seq[:, 0] = 0
seq[:, 1:n + 1] = rng.integers(1, K + 1, size=(N, n))
gcfg = GPTConfig(vocab_size=K + 2, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=n + 2)
torch.manual_seed(0)
save("gpt_init", GPT(gcfg))
torch.manual_seed(0)
model = train_gpt(seq, np.ones_like(seq, bool), os.path.join(out, "gpt"), gcfg, epochs=3, batch_size=batch,
                  train_config=cfg, seed=0, val_fraction=0.0)
save("gpt", model)
with torch.no_grad():
    res["gpt"] = model.loss(torch.from_numpy(seq), torch.ones(seq.shape, dtype=torch.bool)).item()

# ---- GPT streamed from token shards with uneven work units (6 units of 25/15 jets)
from omnijet_lib.data.shards import ShardLoader, TokenShardDataset, write_shard
paths = []
for i in range(3):
    r = np.random.default_rng(10 + i)
    counts = r.integers(1, n + 1, 40)
    paths.append(write_shard(os.path.join(out, f"shard{i}_rank{rank}.npz"), r.integers(0, K, counts.sum()),
                             counts, np.zeros(40), np.arange(40), num_codes=K))
seen = {}

class Recording(GPTModule):
    def training_step(self, b, i):
        seen.setdefault(self.current_epoch, []).extend(b["index"].tolist())
        return super().training_step(b, i)

torch.manual_seed(0)
fit(Recording(gcfg), ShardLoader(TokenShardDataset(paths, batch_size=8, unit_jets=25, seed=0)),
    config=TrainConfig(**{**cfg.__dict__, "max_epochs": 2}))
res["shard_indices"] = seen
with open(os.path.join(out, f"result_rank{rank}.json"), "w") as f:
    json.dump(res, f)
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the worker with 2 DDP processes and with 1 process, concurrently; return the folders."""
    base = tmp_path_factory.mktemp("ddp")
    script = base / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    procs = {}
    for devices in (2, 1):
        out = base / f"d{devices}"
        out.mkdir()
        procs[devices] = (out, subprocess.Popen([sys.executable, str(script), str(out), str(devices)], cwd=base,
                                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for devices, (out, p) in procs.items():
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"devices={devices} failed:\n{log[-3000:]}"
    return {d: out for d, (out, _) in procs.items()}


def _flat(path):
    from safetensors.torch import load_file

    return torch.cat([v.float().flatten() for _, v in sorted(load_file(path).items()) if v.is_floating_point()])


def _result(out, rank=0):
    return json.loads((out / f"result_rank{rank}.json").read_text())


@pytest.mark.parametrize("name", ["vq_sync", "vq", "gpt"])
def test_both_ranks_end_with_identical_weights(runs, name):
    r0, r1 = (_flat(runs[2] / f"{name}_rank{r}.safetensors") for r in (0, 1))
    assert torch.equal(r0, r1)
    assert not torch.equal(r0, _flat(runs[2] / f"{name}_init_rank0.safetensors"))  # it did train


@pytest.mark.parametrize("name", ["vq", "gpt"])
def test_ddp_matches_single_process_on_the_same_global_batch(runs, name):
    ddp, single = _flat(runs[2] / f"{name}_rank0.safetensors"), _flat(runs[1] / f"{name}_rank0.safetensors")
    init = _flat(runs[1] / f"{name}_init_rank0.safetensors")
    # weights: the difference is float noise (gradient all-reduce order; Adam turns the
    # ~1e-9 noise gradient of the attention key bias, which cannot change the output, into
    # ~1e-4 steps) and must be tiny against the training update. A wrong split (each rank
    # on its own batches, or on every batch) gives a ratio of 0.7-1.3.
    assert (ddp - single).norm() / (single - init).norm() < 0.03
    assert _result(runs[2])[name] == pytest.approx(_result(runs[1])[name], rel=1e-4)  # final loss


def test_streamed_shards_split_across_ranks_with_equal_steps(runs):
    a, b = (_result(runs[2], r)["shard_indices"] for r in (0, 1))
    assert a.keys() == b.keys() == {"0", "1"}
    for epoch in a:
        assert len(a[epoch]) and not set(a[epoch]) & set(b[epoch])  # no jet on two ranks
        assert len(set(a[epoch])) == len(a[epoch])
        assert len(a[epoch]) + len(b[epoch]) >= 120 - 2 * 25      # at most ~one unit per rank left out
    assert sorted(_result(runs[1])["shard_indices"]["0"]) == list(range(120))  # 1 process: every jet


# --------------------------------------------------------------------------- in-process pieces
def _fake_trainer(world, rank):
    return types.SimpleNamespace(world_size=world, global_rank=rank)


def test_rank_aware_loaders_give_each_rank_distinct_batches_of_equal_count():
    from omnijet_lib.training.batching import PaddedDataset, make_loader
    from omnijet_lib.training.fit import rank_aware_loaders

    rng = np.random.default_rng(0)
    mask = np.arange(10)[None, :] < rng.integers(1, 11, 103)[:, None]
    per_rank = []
    for rank in range(3):
        loader = make_loader(PaddedDataset(np.zeros((103, 10, 3)), mask, index=np.arange(103)), 8, seed=4)
        rank_aware_loaders(loader, None).setup(_fake_trainer(3, rank), None, "fit")
        assert (loader.batch_sampler.num_replicas, loader.batch_sampler.rank) == (3, rank)
        per_rank.append([b["index"].tolist() for b in loader])
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == 5  # 13 batches -> 5 each (2 repeated)
    seen = [i for r in per_rank for b in r for i in b]
    assert set(seen) == set(range(103))
    rank_aware_loaders(loader).setup(_fake_trainer(1, 0), None, "fit")  # 1 process: left alone
    assert loader.batch_sampler.num_replicas == 3


def test_bucketed_batch_order_changes_every_epoch(tmp_path):
    from omnijet_lib.models.gpt import GPTConfig
    from omnijet_lib.training.batching import PaddedDataset, make_loader
    from omnijet_lib.training.fit import TrainConfig, fit
    from omnijet_lib.training.gpt import GPTModule

    seq = np.full((24, 6), 9, np.int64)
    seq[:, 0] = 0
    seq[:, 1:4] = np.random.default_rng(0).integers(1, 9, (24, 3))
    loader = make_loader(PaddedDataset(seq, np.ones_like(seq, bool), index=np.arange(24)), 8, seed=0)
    orders = []

    class Recording(GPTModule):
        def training_step(self, b, i):
            orders.append(b["index"].tolist())
            return super().training_step(b, i)

    fit(Recording(GPTConfig(vocab_size=10, n_embd=8, n_head=2, n_layer=1, ffn=16, max_len=6)), loader,
        config=TrainConfig(max_epochs=2, accelerator="cpu", progress_bar=False))
    assert loader.batch_sampler.epoch == 1            # Lightning's set_epoch reached the sampler
    assert orders[:3] != orders[3:] and sorted(sum(orders[:3], [])) == sorted(sum(orders[3:], []))


def test_vqvae_mixed_precision_keeps_the_quantizer_in_fp32(monkeypatch):
    from omnijet_lib.tokenizers import quantizer
    from omnijet_lib.training.fit import TrainConfig
    from omnijet_lib.training.vqvae import train_tokenizer

    seen = []
    forward, nearest = quantizer.VectorQuantizer.forward, quantizer.nearest_code

    def spy_forward(self, z, mask=None):
        out = forward(self, z, mask)
        seen.append(("vq", z.dtype, out.loss.dtype))
        return out

    def spy_nearest(z, codes, *a, **k):
        seen.append(("search", z.dtype, codes.dtype, torch.is_autocast_enabled("cpu")))
        return nearest(z, codes, *a, **k)

    monkeypatch.setattr(quantizer.VectorQuantizer, "forward", spy_forward)
    monkeypatch.setattr(quantizer, "nearest_code", spy_nearest)
    x = np.random.default_rng(0).normal(size=(16, 8, 3)).astype(np.float32)
    train_tokenizer("conditional", x, np.ones((16, 8), bool), num_codes=8, epochs=1, batch_size=8, val_fraction=0,
                    train_config=TrainConfig(accelerator="cpu", precision="bf16-mixed", progress_bar=False),
                    hidden_dim=8, num_blocks=1, num_heads=2, mlp_hidden=8)
    vq = [s for s in seen if s[0] == "vq"]
    assert vq and all(z == torch.bfloat16 and loss == torch.float32 for _, z, loss in vq)  # encoder in bf16
    assert all(s[1:] == (torch.float32, torch.float32, False) for s in seen if s[0] == "search")

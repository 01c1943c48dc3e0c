"""Streaming tokenization into token shards, and the streaming training dataset over shards."""

import json
import hashlib
import os
import types

import awkward as ak
import numpy as np
import pytest
import torch

from omnijet_lib.data import shards as shards_mod
from omnijet_lib.data.jetclass import make_jets, read_jetclass, write_jetclass
from omnijet_lib.data.shards import ShardLoader, TokenShardDataset, read_manifest, read_shard, write_shard
from omnijet_lib.io import OmnijetError
from omnijet_lib.tokenizers import BinnedConfig, BinnedTokenizer, VQVAE, VQVAEConfig, save_tokenizer, tokenize
from omnijet_lib.tokenizers import streaming

torch.set_num_threads(1)


def _jets(n, seed, label):
    """JetClass-like jets: 5-40 massless constituents around the z=0 plane (GeV)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 40, n)
    m = int(counts.sum())
    pt, eta, phi = rng.exponential(20.0, m) + 1.0, rng.normal(0, 0.2, m), rng.normal(0, 0.2, m)
    part = ak.zip({"px": pt * np.cos(phi), "py": pt * np.sin(phi), "pz": pt * np.sinh(eta), "E": pt * np.cosh(eta)})
    return make_jets(ak.unflatten(part, counts), label)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    d = tmp_path_factory.mktemp("root")
    return [write_jetclass(d / "ZJetsToNuNu_000.root", _jets(150, 1, 0)),
            write_jetclass(d / "TTBar_000.root", _jets(130, 2, 8))]


@pytest.fixture(scope="module")
def vq_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16, num_codes=64))
    return save_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.safetensors", tok)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --------------------------------------------------------------------------- tokenization
def test_shards_hold_the_tokens_of_the_whole_files(tmp_path, roots):
    from omnijet_lib.data.features import constituent_features, to_padded

    x, mask = to_padded(constituent_features(read_jetclass(roots)))
    tok = BinnedTokenizer(BinnedConfig(bins=5)).fit(x, mask)          # per constituent: exact
    ckpt = save_tokenizer(tmp_path / "binned.safetensors", tok)
    man = streaming.tokenize_files(ckpt, [str(r) for r in roots], tmp_path / "out", chunk=64, device="cpu")

    assert [s["name"] for s in man["shards"]] == [f"ZJetsToNuNu_000_{i:05d}.npz" for i in range(3)] + \
        [f"TTBar_000_{i:05d}.npz" for i in range(3)]
    assert man["jets"] == 280 and man["complete"] and man["num_codes"] == 125
    assert man["class_counts"][0] == 150 and man["class_counts"][8] == 130
    assert man["tokenizer_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert read_manifest(tmp_path / "out") == man
    parts = [read_shard(tmp_path / "out" / s["name"], 125) for s in man["shards"]]
    assert parts[0]["tokens"].dtype == np.int16
    expect = tokenize(tok, x, mask)
    np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), expect[expect >= 0])
    np.testing.assert_array_equal(np.concatenate([p["counts"] for p in parts]), (expect >= 0).sum(1))
    np.testing.assert_array_equal(np.concatenate([p["labels"] for p in parts]), [0] * 150 + [8] * 130)
    np.testing.assert_array_equal(parts[1]["entry"], np.arange(64, 128))


def test_class_filter(tmp_path, roots, vq_ckpt):
    man = streaming.tokenize_files(vq_ckpt, roots, tmp_path, chunk=100, classes=["Tbqq"], device="cpu")
    assert man["jets"] == 130 and man["classes"] == [8]
    assert all(s["jets"] == 0 for s in man["shards"] if s["name"].startswith("ZJets"))


def test_resume_is_byte_identical_and_skips_finished_shards(tmp_path, roots, vq_ckpt, monkeypatch):
    streaming.tokenize_files(vq_ckpt, roots, tmp_path / "a", chunk=40, device="cpu")
    real_write, calls = streaming.write_shard, []

    def interrupted(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the 4th shard is being made
        calls.append(a[0])
        return real_write(*a, **k)

    monkeypatch.setattr(streaming, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        streaming.tokenize_files(vq_ckpt, roots, tmp_path / "b", chunk=40, device="cpu")
    assert len(read_manifest(tmp_path / "b")["shards"]) == 3
    (tmp_path / "b" / ".TTBar_000_00000.npz.x1.part").write_bytes(b"half")  # a killed write's temp file
    before = {p: p.stat().st_mtime_ns for p in calls}

    calls.clear()
    monkeypatch.setattr(streaming, "write_shard", lambda *a, **k: (calls.append(a[0]), real_write(*a, **k))[1])
    man = streaming.tokenize_files(vq_ckpt, roots, tmp_path / "b", chunk=40, device="cpu")
    assert len(calls) == len(man["shards"]) - 3                      # only the missing ones
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished ones untouched
    assert _files(tmp_path / "a") == _files(tmp_path / "b")           # no .part left, same bytes


def test_resume_redoes_missing_truncated_and_altered_shards(tmp_path, roots, vq_ckpt, caplog):
    out = tmp_path / "s"
    streaming.tokenize_files(vq_ckpt, roots, out, chunk=40, device="cpu")
    reference = _files(out)
    names = sorted(p.name for p in out.glob("*.npz"))
    (out / names[0]).write_bytes((out / names[0]).read_bytes()[:100])       # truncated
    (out / names[1]).write_bytes(b"")                                         # 0 bytes
    flipped = bytearray((out / names[2]).read_bytes())
    flipped[len(flipped) // 2] ^= 1                                           # same size, other bytes
    (out / names[2]).write_bytes(bytes(flipped))
    (out / names[3]).unlink()                                                 # gone
    with caplog.at_level("WARNING"):
        streaming.tokenize_files(vq_ckpt, roots, out, chunk=40, device="cpu")
    assert sum("redoing it" in r.message for r in caplog.records) == 4
    assert _files(out) == reference


def test_resume_refuses_an_input_that_changed(tmp_path, roots, vq_ckpt):
    inputs = [tmp_path / r.name for r in roots]
    for src, dst in zip(roots, inputs):
        dst.write_bytes(src.read_bytes())
    out = tmp_path / "s"
    streaming.tokenize_files(vq_ckpt, inputs, out, chunk=40, device="cpu")
    os.utime(inputs[0], ns=(10**9, 10**9))  # touched or copied: the same bytes are the same input
    streaming.tokenize_files(vq_ckpt, inputs, out, chunk=40, device="cpu")
    before = _files(out)
    data = bytearray(inputs[0].read_bytes())
    data[len(data) // 2] ^= 1                    # same size, other bytes
    inputs[0].write_bytes(bytes(data))
    with pytest.raises(OmnijetError, match=f"{inputs[0]}: changed since {out} was tokenized from it "
                       r"\(fingerprint differ\); to start over, delete"):
        streaming.tokenize_files(vq_ckpt, inputs, out, chunk=40, device="cpu")
    write_jetclass(inputs[0], _jets(120, 7, 0))  # replaced by other jets under the same name
    with pytest.raises(OmnijetError, match=r"\(size and fingerprint differ\)"):
        streaming.tokenize_files(vq_ckpt, inputs, out, chunk=40, device="cpu")
    assert _files(out) == before


def test_non_finite_or_collapsed_tokenizers_write_nothing(tmp_path, roots):
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16, num_codes=64))
    with torch.no_grad():
        tok.vq.codebook.weight[:] = 1.0  # every code the same vector: every constituent gets code 0
    collapsed = save_tokenizer(tmp_path / "collapsed.safetensors", tok)
    with pytest.raises(OmnijetError, match=r"collapsed.safetensors: maps all \d+ constituents of .*ZJetsToNuNu_000.root "
                       r"entries 0..39 to code 0; a collapsed or broken tokenizer, nothing written"):
        streaming.tokenize_files(collapsed, roots, tmp_path / "a", chunk=40, device="cpu")
    assert not list((tmp_path / "a").glob("*.npz"))
    with torch.no_grad():
        tok.decoder.out.weight[0, 0] = float("nan")
    broken = save_tokenizer(tmp_path / "nan.safetensors", tok)
    with pytest.raises(OmnijetError, match=r"nan.safetensors: weight decoder.out.weight holds 1 NaN/inf values"):
        streaming.tokenize_files(broken, roots, tmp_path / "b", chunk=40, device="cpu")
    assert not (tmp_path / "b").exists()


def test_cli_and_one_line_errors(tmp_path, roots, vq_ckpt, capsys):
    from omnijet_lib.cli import main

    out = tmp_path / "s"
    assert main(["tokenize", "--tokenizer", str(vq_ckpt), "--in", str(roots[0].parent / "*.root"),
                 "--out", str(out), "--chunk", "200", "--device", "cpu"]) == 0
    assert "280 jets" in capsys.readouterr().out
    for argv, msg in [
        (["--chunk", "100"], "other settings (chunk differ)"),
        (["--chunk", "0"], "--chunk"),
    ]:
        assert main(["tokenize", "--tokenizer", str(vq_ckpt), "--in", str(roots[0]), "--out", str(out), *argv]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    assert main(["tokenize", "--tokenizer", str(tmp_path / "none.safetensors"), "--in", str(roots[0]),
                 "--out", str(tmp_path / "t")]) == 1
    assert "tokenizer checkpoint not found" in capsys.readouterr().err


def test_bad_shards_are_rejected(tmp_path):
    good = dict(tokens=np.array([1, 2, 3]), counts=np.array([2, 1]), labels=np.array([0, 8]), entry=np.array([0, 1]))
    write_shard(tmp_path / "bad_id.npz", **{**good, "tokens": np.array([1, 70, 3])}, num_codes=64)
    with pytest.raises(OmnijetError, match=r"bad_id.npz: token id 70 out of range 0..63$"):
        read_shard(tmp_path / "bad_id.npz")
    ds = TokenShardDataset([tmp_path / "bad_id.npz"], batch_size=2)   # labels are fine: caught when streamed
    with pytest.raises(OmnijetError, match="token id 70 out of range"):
        list(ds)
    write_shard(tmp_path / "ok.npz", **good, num_codes=64)
    with pytest.raises(OmnijetError, match="tokenized with 64 codes, expected 128"):
        read_shard(tmp_path / "ok.npz", num_codes=128)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(OmnijetError, match="junk.npz: not a readable token shard"):
        read_shard(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", tokens=np.array([object()]), counts=[1], labels=[0], entry=[0], num_codes=4)
    with pytest.raises(OmnijetError, match="obj.npz: not a readable token shard"):
        read_shard(tmp_path / "obj.npz")


# --------------------------------------------------------------------------- streaming dataset
K = 50


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """4 shards × 60 jets (0-20 tokens each, labels 0/8), written directly."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(3)
    for i in range(4):
        counts = rng.integers(0, 21, 60)
        write_shard(d / f"s{i}.npz", rng.integers(0, K, counts.sum()), counts, rng.choice([0, 8], 60),
                    np.arange(60), num_codes=K)
    return d


def _reference(shard_dir):
    """Per global index: (codes, label) straight from the files."""
    out = []
    for i in range(4):
        d = read_shard(shard_dir / f"s{i}.npz")
        out += list(zip(np.split(d["tokens"], np.cumsum(d["counts"])[:-1]), d["labels"]))
    return out


def _run(ds, world, workers, monkeypatch):
    """Batches of every (rank, worker) slot, as {(rank, worker): [batch, ...]}, in-process."""
    got = {}
    for rank in range(world):
        ds.num_replicas, ds.rank = world, rank
        for w in range(workers):
            info = types.SimpleNamespace(id=w, num_workers=workers)
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            got[rank, w] = list(ds)
    monkeypatch.undo()
    return got


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 3), (2, 1), (2, 2)])
def test_ranks_and_workers_partition_the_jets(shard_dir, monkeypatch, world, workers):
    ds = TokenShardDataset(sorted(shard_dir.glob("s*.npz")), batch_size=8, unit_jets=30, pool_batches=2, seed=5)
    ds.num_workers = workers
    got = _run(ds, world, workers, monkeypatch)
    seen = np.concatenate([b["index"].numpy() for bs in got.values() for b in bs])
    assert len(seen) == len(set(seen.tolist())) == 240                 # 8 equal units: nothing dropped
    per_rank = [sum(len(got[r, w]) for w in range(workers)) for r in range(world)]
    ds.num_replicas, ds.rank = world, 0
    assert per_rank == [len(ds)] * world                              # equal step counts for DDP
    ref = _reference(shard_dir)
    for b in (b for bs in got.values() for b in bs):
        x, mask = b["x"].numpy(), b["mask"].numpy()
        n = mask.sum(1) - 2
        assert x.shape[1] == n.max() + 2                              # trimmed to the longest jet
        for row, i in enumerate(b["index"].numpy()):
            codes, label = ref[i]
            assert x[row, 0] == 0 and x[row, n[row] + 1] == K + 1 and (x[row, n[row] + 1:] == K + 1).all()
            np.testing.assert_array_equal(x[row, 1:n[row] + 1] - 1, codes)
            assert b["label"][row] == label


def test_uneven_units_drop_little_and_keep_steps_equal(shard_dir, monkeypatch):
    ds = TokenShardDataset(sorted(shard_dir.glob("s*.npz")), batch_size=8, unit_jets=50, seed=1)  # 8 units of 50/10
    got = _run(ds, 3, 1, monkeypatch)
    lens = {len(v) for v in got.values()}
    seen = np.concatenate([b["index"].numpy() for bs in got.values() for b in bs])
    assert len(lens) == 1 and len(seen) == len(set(seen.tolist()))
    assert 240 - 3 * 50 <= len(seen) < 240


def test_order_is_deterministic_for_seed_and_epoch(shard_dir):
    def order(seed=0, epoch=0):
        ds = TokenShardDataset(sorted(shard_dir.glob("s*.npz")), batch_size=8, unit_jets=30, seed=seed)
        ds.set_epoch(epoch)
        return np.concatenate([b["index"].numpy() for b in ds])

    a = order()
    np.testing.assert_array_equal(a, order())
    assert sorted(a) == sorted(order(epoch=1)) == list(range(240))
    assert not np.array_equal(a, order(epoch=1)) and not np.array_equal(a, order(seed=1))


def test_bucketing_reduces_padding(shard_dir):
    def padding(pool):
        ds = TokenShardDataset(sorted(shard_dir.glob("s*.npz")), batch_size=8, pool_batches=pool, seed=2)
        return sum((~b["mask"]).sum().item() for b in ds)

    assert padding(30) < 0.5 * padding(1)


def test_class_selection(shard_dir):
    ds = TokenShardDataset(sorted(shard_dir.glob("s*.npz")), batch_size=16, classes=[8])
    labels = torch.cat([b["label"] for b in ds])
    assert len(labels) == ds.num_jets > 0 and (labels == 8).all()


def test_shard_loader_with_real_workers_and_manifest(tmp_path, roots, vq_ckpt):
    streaming.tokenize_files(vq_ckpt, roots, tmp_path, chunk=50, device="cpu")
    ds = TokenShardDataset(tmp_path, batch_size=16, unit_jets=20)
    loader = ShardLoader(ds, num_workers=2)
    batches = list(loader)
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert len(batches) == len(loader) and sorted(seen) == list(range(280))
    with pytest.raises(OmnijetError, match="shards hold 64 codes, expected 8192"):
        TokenShardDataset(tmp_path, num_codes=8192)


def test_gpt_trains_from_shards_and_epochs_advance(shard_dir, tmp_path):
    from omnijet_lib.models.gpt import GPTConfig
    from omnijet_lib.training.fit import TrainConfig, fit
    from omnijet_lib.training.gpt import GPTModule

    ds = TokenShardDataset(sorted(shard_dir.glob("s*.npz")), batch_size=32, seed=0)
    module = GPTModule(GPTConfig(vocab_size=K + 2, n_embd=16, n_head=2, n_layer=1, ffn=32, max_len=22))
    cfg = TrainConfig(max_epochs=2, accelerator="cpu", devices=1, progress_bar=False)
    fit(module, ShardLoader(ds), out_dir=tmp_path, config=cfg)
    assert ds.epoch == 1                                   # Lightning reached set_epoch through loader.sampler
    assert module.trainer_.global_step == 2 * len(ds)
    assert np.isfinite(module.trainer_.callback_metrics["train_loss"].item())


def test_write_shard_refuses_inconsistent_arrays(tmp_path):
    with pytest.raises(OmnijetError, match="shard arrays disagree"):
        write_shard(tmp_path / "x.npz", [1, 2], [1], [0], [0], num_codes=8)
    assert not any(tmp_path.iterdir())


def test_unreadable_manifest(tmp_path):
    (tmp_path / shards_mod.MANIFEST).write_text("{")
    with pytest.raises(OmnijetError, match="manifest is not valid JSON"):
        TokenShardDataset(tmp_path)


@pytest.mark.parametrize("name", ["../outside.npz", "/etc/x.npz", "sub/a.npz", "a.txt", None, "..\\a.npz"])
def test_manifest_shards_must_be_files_of_its_folder(tmp_path, name):
    """A shared manifest names the shards to read: only .npz files beside it."""
    (tmp_path / shards_mod.MANIFEST).write_text(json.dumps({"num_codes": 8, "shards": [{"name": name}]}))
    with pytest.raises(OmnijetError, match=r"shard 0 is named .*not a \.npz file name inside"):
        TokenShardDataset(tmp_path)


# --------------------------------------------------------------------------- paper-profile dry run
def test_paper_profile_dry_run_prints_sizes_steps_and_gpu_hours(capsys):
    from omnijet_lib.figures import run_figures

    with pytest.raises(OmnijetError, match=r"paper.yaml: inputs missing for 01_token_quality, 02_generation, "
                       r"03_transfer_learning, 04_epic_fm_comparison, 06_density, 07_few_jets \(the MISSING lines above\)"):
        run_figures("paper", dry_run=True)  # JetClass is not downloaded here
    out = capsys.readouterr().out
    assert "[01_token_quality]" in out and "VQ-VAE conditional K=8192" in out
    # the paper's JetClass files, sized by their official names before they are downloaded
    assert "train_100M/*_00[0-5].root (official JetClass names: 60 files, 6000000 jets once downloaded)" in out
    # the official step counts: 100 epochs of 5850 tokenizer steps, 7800 GPT steps per epoch
    assert ("VQ-VAE conditional K=8192 (the profile's; trained once, by the first notebook that needs it) "
            "[store: trains it]: "
            "3240000 jets x 100 epochs, batch 512: 585000 steps") in out
    # the backbone streamed from token shards of the whole training set, 7800 steps per epoch
    backbone = next(line for line in out.splitlines() if "GPT combined, streamed" in line)
    assert "streamed from ../data/shards/train_100M_k8192: MISSING (omnijet tokenize" in backbone
    assert backbone.endswith("[store: trains it]: 20000000 jets x 30 epochs, batch 256: 234000 steps, 1.11 GPU-h")
    # the profile's tokenizer trains on its own files: the same cost in every notebook that asks for it
    assert len({line for line in out.splitlines() if "VQ-VAE conditional K=8192" in line}) == 1
    assert "embedded simulation" not in out.split("[01_token_quality]")[1].split("[05_token_explorer]")[0]
    assert out.rstrip().splitlines()[-1].startswith("total: ~") and "GPU-h" in out


def test_cost_estimate_counts_files_and_steps(tmp_path):
    from omnijet_lib.figures import GPU_JETS_PER_S, estimate_cost

    write_jetclass(tmp_path / "TTBar_000.root", _jets(40, 3, 8))
    write_jetclass(tmp_path / "ZJetsToNuNu_000.root", _jets(60, 4, 0))
    p = {"data_files": str(tmp_path / "*.root"), "kinds": ["conditional", "binned"], "codebook_sizes": [512],
         "binned_bins": [21], "tokenizer": {"epochs": 2, "batch_size": 10}, "classifier_kw": {"deepsets": {}},
         "classifier_epochs": 1, "classifier_batch_size": 20, "trainer": {"devices": 4, "num_nodes": 2}}
    c = estimate_cost("01_token_quality", p)
    # VQ-VAE on 0.9 x 60% of 100 jets: ceil(54 / 10) x 2 = 12 steps; DeepSets on 3 inputs x 60 jets: 9 steps
    assert c["jets"] == 100 and c["steps"] == 12 + 9
    assert c["gpu_hours"] == pytest.approx((54 * 2 / GPU_JETS_PER_S["vqvae"] + 180 / GPU_JETS_PER_S["deepsets"]) / 3600)
    assert "2 files, 100 jets" in c["lines"][0] and "on 8 GPU(s)" in c["lines"][-1]
    top = estimate_cost("04_epic_fm_comparison", {"data_files": str(tmp_path / "*.root"), "epochs": 1})
    assert top["jets"] == 40                                 # t→bqq' files only, by official name
    missing = estimate_cost("03_transfer_learning", {"data_files": str(tmp_path / "nothing_*.root")})
    assert "MISSING" in missing["lines"][0] and missing["jets"] == 0
    capped = estimate_cost("01_token_quality", dict(p, trainer={"limit_train_batches": 2}))
    assert capped["steps"] == 2 * 2 + 2 * 1  # at most 2 steps per epoch: VQ-VAE 2 epochs, DeepSets 1

"""Concurrency: every command that writes a folder holds its lock; a second run into the same
folder stops at once with one line naming the running process (or queues with ``--wait``), and
a crashed run's lock is taken over. Tokenizing into a folder never drops another input's shards.

The "running process" is a helper that holds the folder's lock (``exclusive_lock``) until told
to stop: deterministic, where two real runs would race.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from omnijet_lib.cli import main as cli
from omnijet_lib.data import write_jetclass
from omnijet_lib.data.shards import read_manifest
from omnijet_lib.io import LOCK_FILE, OmnijetError, exclusive_lock
from omnijet_lib.tokenizers import VQVAE, VQVAEConfig, save_tokenizer
from omnijet_lib.tokenizers.streaming import tokenize_files

from .conftest import one_line_error, random_jets, snapshot

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX advisory locks")


@contextmanager
def held(folder: Path):
    """Another process holding ``folder``'s lock for the block; yields its PID."""
    go = folder.parent / f".{folder.name}.release"
    proc = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time\nfrom omnijet_lib.io import exclusive_lock\n"
        f"with exclusive_lock({str(folder)!r}):\n"
        "    print('held', flush=True)\n"
        f"    while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        go.write_text("")
        assert proc.wait(timeout=30) == 0
        go.unlink()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    torch.manual_seed(0)
    tok = VQVAE(VQVAEConfig(hidden_dim=16, num_blocks=1, num_heads=2, mlp_hidden=16, num_codes=64))
    return save_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.safetensors", tok)


@pytest.fixture
def two_inputs(tmp_path):
    d = tmp_path / "in"
    return [write_jetclass(d / "a.root", random_jets(seed=1)), write_jetclass(d / "b.root", random_jets(seed=2))]


# ------------------------------------------------------------------------------- the lock itself
def test_a_second_holder_stops_at_once_naming_the_first(tmp_path):
    with held(tmp_path / "out") as pid:
        t0 = time.time()
        with one_line_error(f"{tmp_path / 'out'}: in use by process {pid} on ", "rerun with --wait",
                            unchanged=tmp_path / "out"):
            with exclusive_lock(tmp_path / "out"):
                pass
        assert time.time() - t0 < 5  # at once, not after the holder


def test_wait_queues_behind_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    with held(out) as pid:
        import threading

        entered = []

        def second():
            with exclusive_lock(out, wait=True):
                entered.append(time.time())

        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.0)
        assert not entered  # still waiting while the holder runs
        released = time.time()
    t.join(timeout=30)
    assert entered and entered[0] >= released
    assert f"{out}: in use by process {pid} on " in capsys.readouterr().out
    with exclusive_lock(out, wait=True):  # free now: no message
        pass
    assert capsys.readouterr().out == ""


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", (
        "import os\nfrom omnijet_lib.io import exclusive_lock\n"
        f"with exclusive_lock({str(out)!r}):\n    os._exit(9)\n")])  # dies holding it: no clean release
    assert proc.wait(timeout=60) == 9 and json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid
    with exclusive_lock(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of process {proc.pid} on " in caplog.text
    assert (out / LOCK_FILE).read_text() == ""


def test_the_lock_creates_no_folder_in_place_of_a_file(tmp_path):
    (tmp_path / "out").write_text("data")
    with one_line_error("is a file, not a directory", unchanged=tmp_path):
        with exclusive_lock(tmp_path / "out"):
            pass


# -------------------------------------------------------------------------------- the commands
def test_tokenize_into_a_folder_in_use_stops_with_one_line(tmp_path, tokenizer, two_inputs, capsys):
    out = tmp_path / "shards"
    tokenize_files(tokenizer, two_inputs[0], out)
    before = snapshot(out)
    with held(out) as pid:
        assert cli(["tokenize", "--tokenizer", str(tokenizer), "--in", str(two_inputs[1]), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: in use by process {pid} on "), err
    assert snapshot(out) == before


def test_tokenize_with_wait_runs_after_the_holder(tmp_path, tokenizer, two_inputs, capsys):
    out = tmp_path / "shards"
    with held(out):
        import threading

        codes = []
        t = threading.Thread(target=lambda: codes.append(cli(["tokenize", "--tokenizer", str(tokenizer), "--in",
                                                               str(two_inputs[0]), "--out", str(out), "--wait"])))
        t.start()
        time.sleep(1.0)
        assert not codes and not (out / "manifest.json").exists()
    t.join(timeout=60)
    assert codes == [0] and read_manifest(out)["complete"]


def test_tokenize_runs_into_one_folder_keep_each_others_shards(tmp_path, tokenizer, two_inputs):
    """Before: each run rewrote manifest.json with its own shards only, and said complete."""
    out = tmp_path / "shards"
    a = tokenize_files(tokenizer, two_inputs[0], out)
    b = tokenize_files(tokenizer, two_inputs[1], out)
    both = tokenize_files(tokenizer, two_inputs, tmp_path / "together")
    assert [s["name"] for s in b["shards"]] == ["a_00000.npz", "b_00000.npz"]
    assert [Path(i["path"]).name for i in b["inputs"]] == ["a.root", "b.root"]
    assert b["complete"] and b["jets"] == a["jets"] + 12 == both["jets"]
    assert read_manifest(out)["shards"] == b["shards"]
    # a damaged shard of the earlier input is listed no more, and that input is not complete
    (out / "a_00000.npz").write_bytes(b"damaged")
    c = tokenize_files(tokenizer, two_inputs[1], out)
    assert [s["name"] for s in c["shards"]] == ["b_00000.npz"] and not c["complete"]
    d = tokenize_files(tokenizer, two_inputs, out)  # rerun with both: redone, complete again
    assert d["complete"] and [s["name"] for s in d["shards"]] == ["a_00000.npz", "b_00000.npz"]


def test_simulate_into_a_folder_in_use_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "sim"
    with held(out) as pid:
        before = snapshot(out)
        assert cli(["simulate", "--per-class", "10", "--out", str(out), "--classes", "QCD"]) == 1
        assert snapshot(out) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: in use by process {pid} on "), err


def test_training_into_a_run_folder_in_use_waits_for_it(tmp_path, capsys):
    """Two notebooks side by side that both need one model: the second waits, then resumes."""
    from omnijet_lib.models.deepsets import DeepSets, DeepSetsConfig
    from omnijet_lib.training import TrainConfig
    from omnijet_lib.training.batching import PaddedDataset, make_loader
    from omnijet_lib.training.classifier import ClassifierModule
    from omnijet_lib.training.fit import fit

    import numpy as np

    rng = np.random.default_rng(0)
    x, mask = rng.normal(size=(32, 8, 3)).astype(np.float32), np.ones((32, 8), bool)
    loader = make_loader(PaddedDataset(x, mask, label=rng.integers(0, 2, 32)), batch_size=16, shuffle=False)
    module = ClassifierModule(DeepSets(DeepSetsConfig(n_classes=2, phi=[8, 8], f=[8])))
    out = tmp_path / "run"
    with held(out) as pid:
        import threading

        done = []
        t = threading.Thread(target=lambda: done.append(fit(module, loader, out_dir=out,
                                                            config=TrainConfig(max_epochs=1))))
        t.start()
        time.sleep(1.0)
        assert not done and not (out / "last.ckpt").exists()
    t.join(timeout=120)
    assert done and (out / "last.ckpt").is_file()
    assert f"{out}: in use by process {pid} on " in capsys.readouterr().out


@pytest.mark.parametrize("action", [["fetch", "--dest", "{dest}", "--url", "http://127.0.0.1:9/never-asked"]])
def test_checkpoints_into_a_folder_in_use_stop_with_one_line(tmp_path, action, capsys):
    src = tmp_path / "published"
    for rel in ("vqvae_8192_tokens/model_ckpt.ckpt", "generative_8192_tokens/OmniJet_generative_model_x.ckpt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"not read: the folder is in use")
    dest = tmp_path / "dest"
    with held(dest) as pid:
        before = snapshot(tmp_path)
        assert cli(["checkpoints", *(a.format(dest=dest, src=src) for a in action)]) == 1
        assert snapshot(tmp_path) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {dest}: in use by process {pid} on "), err


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_figures_into_a_folder_in_use_stop_before_any_notebook_runs(tmp_path, jobs, capsys):
    from omnijet_lib.figures import main as figures

    figs, executed = tmp_path / "figs", tmp_path / "executed"
    profile = tmp_path / "p.yaml"
    profile.write_text(f"common:\n  figures_dir: {figs}\n")
    with held(figs) as pid:
        before = snapshot(tmp_path)
        assert figures(["--profile", str(profile), "--only", "00", "05", "--jobs", jobs,
                        "--executed-dir", str(executed)]) == 1
        assert snapshot(tmp_path) == before and not list(executed.glob("*.ipynb"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {figs}: in use by process {pid} on "), err


def test_a_thread_may_take_its_own_lock_again(tmp_path):
    """The store locks a run folder around a training whose fit() locks the same folder."""
    with exclusive_lock(tmp_path / "run"):
        with exclusive_lock(tmp_path / "run"):
            assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert (tmp_path / "run" / LOCK_FILE).read_text() != ""  # the inner block does not release it
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""

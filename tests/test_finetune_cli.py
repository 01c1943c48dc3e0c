"""``omnijet finetune`` and ``omnijet classify`` on the 500 real JetClass jets, with a tiny backbone
of a model store (tests/conftest.py ``tiny_store``)."""

import json

import numpy as np
import pytest

from omnijet_lib.cli import main as cli
from omnijet_lib.data import read_jetclass
from omnijet_lib.data.jetclass import CLASS_LABELS

from reliability.conftest import snapshot


def run(args, capsys):
    code = cli(args)
    out, err = capsys.readouterr()
    return code, out, err


#: the options of the command lines examples/slurm/finetune.sbatch runs (tests/test_train_cli.py checks)
FINETUNE_OPTIONS = ["--backbone", "--train", "--signal", "--background", "--epochs", "--store", "--out", "--device"]
CLASSIFY_OPTIONS = ["--model", "--in", "--out"]


@pytest.fixture(scope="module")
def binary(tiny_store, real_path, tmp_path_factory):
    """A binary t→bqq' vs q/g classifier fine-tuned on the real jets (its store and metrics)."""
    store = tmp_path_factory.mktemp("classifiers")
    metrics = store / "metrics.json"
    args = ["finetune", "--backbone", str(tiny_store / "gpt_combined"), "--train", str(real_path),
            "--signal", "Tbqq", "--background", "QCD", "--epochs", "2", "--store", str(store),
            "--out", str(metrics), "--device", "cpu"]
    assert [a for a in args if a.startswith("--")] == FINETUNE_OPTIONS
    assert cli(args) == 0
    return store, json.loads(metrics.read_text())


def test_finetune_writes_a_classifier_run_and_its_metrics(binary, real_jets):
    store, m = binary
    labels = np.asarray(real_jets.label)
    n_pair = int(((labels == 0) | (labels == 8)).sum())
    assert m["classes"] == ["QCD", "Tbqq"] and m["strategy"] == "finetune"
    assert m["n_train"] + m["val"]["jets"] + m["test"]["jets"] == n_pair  # 60/20/20 of the two classes
    for part in ("val", "test"):
        assert 0 <= m[part]["accuracy"] <= 1 and 0 <= m[part]["auc"] <= 1
    run_dir = store / "classifier_finetune_QCD_Tbqq" / m["classifier"]["settings_hash"]
    assert (run_dir / "classifier.safetensors").is_file() and json.loads((run_dir / "run.json").read_text())["complete"]
    assert not list(run_dir.glob("*.ckpt"))  # the weights are in classifier.safetensors


def test_finetune_again_reuses_the_run(binary, tiny_store, real_path, capsys):
    store, first = binary
    code, out, err = run(["finetune", "--backbone", str(tiny_store / "gpt_combined"), "--train", str(real_path),
                          "--signal", "Tbqq", "--background", "QCD", "--epochs", "2", "--store", str(store)], capsys)
    again = json.loads(out)
    assert code == 0 and "reusing" in err and again["classifier"]["trained_here"] is False
    assert again["test"] == first["test"]


def test_classify_scores_every_jet_of_the_file(binary, real_path, real_jets, tmp_path, capsys):
    store, m = binary
    out = tmp_path / "scores.npz"
    args = ["classify", "--model", str(store / "classifier_finetune_QCD_Tbqq"), "--in", str(real_path), "--out", str(out)]
    assert [a for a in args if a.startswith("--")] == CLASSIFY_OPTIONS
    code, stdout, _ = run(args, capsys)
    assert code == 0 and stdout.strip() == str(out)
    s = np.load(out)
    assert len(s["entry"]) == len(real_jets) == 500
    np.testing.assert_array_equal(s["entry"], np.arange(500))
    assert set(s["source_file"]) == {str(real_path)}
    np.testing.assert_array_equal(s["label"], np.asarray(real_jets.label))
    np.testing.assert_allclose(s["p_QCD"] + s["p_Tbqq"], 1, rtol=1e-5)
    assert s["p_Tbqq"].std() > 0  # the scores depend on the jet


def test_ten_class_finetune(tiny_store, real_path, tmp_path, capsys):
    code, out, _ = run(["finetune", "--backbone", str(tiny_store / "gpt_combined"), "--train", str(real_path),
                        "--signal", *CLASS_LABELS[1:], "--background", "QCD", "--epochs", "1", "--strategy", "frozen",
                        "--store", str(tmp_path)], capsys)
    m = json.loads(out)
    assert code == 0 and m["classes"] == list(CLASS_LABELS) and m["strategy"] == "frozen"
    assert len(m["test"]["auc_per_class"]) == 10 and m["n_train"] + m["val"]["jets"] + m["test"]["jets"] == 500
    assert (tmp_path / "classifier_frozen_10class").is_dir()


@pytest.mark.parametrize("extra, fragment", [
    (["--signal", "Tblv", "--background", "QCD"], "--signal: unknown jet class 'Tblv'"),
    (["--signal", "Tbqq", "--background", "Tbqq"], "--signal and --background both name [8]"),
    (["--signal", "Tbqq", "--background", "QCD", "--n-train", "7"], "--n-train 7: must be a multiple of the 2 classes"),
    (["--signal", "Tbqq", "--background", "QCD", "--n-train", "1000"], "--n-train 1000: needs 500 training jets of 0"),
    (["--signal", "Tbqq", "--background", "QCD", "--epochs", "0"], "--epochs must be positive, got 0"),
    (["--signal", "Tbqq", "--background", "QCD", "--device", "gpu7"], "--device 'gpu7': not a device"),
])
def test_finetune_refuses_bad_options_in_one_line(extra, fragment, tiny_store, real_path, tmp_path, capsys):
    before = snapshot(tmp_path)
    code, _, err = run(["finetune", "--backbone", str(tiny_store / "gpt_combined"), "--train", str(real_path),
                        "--store", str(tmp_path), *extra], capsys)
    assert code == 1 and err.count("\n") == 1 and fragment in err, err
    assert snapshot(tmp_path) == before


def test_finetune_and_classify_name_a_wrong_model(tiny_store, real_path, tmp_path, capsys):
    code, _, err = run(["finetune", "--backbone", str(tmp_path / "nope"), "--train", str(real_path),
                        "--signal", "Tbqq", "--background", "QCD", "--store", str(tmp_path)], capsys)
    assert code == 1 and "--backbone" in err and "no such run folder" in err
    code, _, err = run(["finetune", "--backbone", "published", "--train", str(real_path),
                        "--signal", "Tbqq", "--background", "QCD", "--store", str(tmp_path)], capsys)
    assert code == 1 and "omnijet checkpoints convert" in err
    code, _, err = run(["classify", "--model", str(tiny_store / "gpt_combined"), "--in", str(real_path),
                        "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 1 and "holds no classifier.safetensors" in err and err.count("\n") == 1
    code, _, err = run(["classify", "--model", str(tiny_store / "gpt_combined"), "--in", str(real_path),
                        "--out", str(tmp_path / "s.csv")], capsys)
    assert code == 1 and "--out" in err and ".npz or .parquet" in err
    assert not list(tmp_path.iterdir())


def test_a_classifier_run_holds_its_tokenizer(binary, tiny_store, real_path, tmp_path, capsys):
    """classify opens the tokenizer inside the run, never the path the weights record (a shared
    classifier could name any file): a copied run scores alike, one without its tokenizer is refused."""
    import shutil

    store, _ = binary
    run_dir = next((store / "classifier_finetune_QCD_Tbqq").iterdir())
    copy = tmp_path / "elsewhere" / "classifier_finetune_QCD_Tbqq" / run_dir.name
    shutil.copytree(run_dir, copy)
    scores = {}
    for name, model in (("here", run_dir), ("copy", copy)):
        code, _, err = run(["classify", "--model", str(model), "--in", str(real_path), "--out",
                            str(tmp_path / f"{name}.npz")], capsys)
        assert code == 0, err
        scores[name] = np.load(tmp_path / f"{name}.npz")["p_Tbqq"]
    np.testing.assert_array_equal(scores["here"], scores["copy"])
    (copy / "tokenizer.safetensors").unlink()
    code, _, err = run(["classify", "--model", str(copy), "--in", str(real_path), "--out", str(tmp_path / "x.npz")],
                       capsys)
    assert code == 1 and "holds no tokenizer.safetensors" in err and not (tmp_path / "x.npz").exists()


def test_classify_writes_parquet_too(binary, real_path, tmp_path, capsys):
    import pyarrow.parquet as pq

    store, _ = binary
    out = tmp_path / "scores.parquet"
    code, _, _ = run(["classify", "--model", str(store / "classifier_finetune_QCD_Tbqq"), "--in", str(real_path),
                      "--out", str(out)], capsys)
    table = pq.read_table(out).to_pydict()
    assert code == 0 and set(table) == {"source_file", "entry", "label", "p_QCD", "p_Tbqq"}
    assert table["entry"] == list(range(500)) and set(table["source_file"]) == {str(real_path)}

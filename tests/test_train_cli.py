"""``omnijet train``: the profile's tokenizer and backbones into its model store, the very runs the
notebooks ask for; and a backbone streamed from token shards by 2 DDP processes (gloo, CPU)
started from the command line, with a kill and a resume."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from omnijet_lib.cli import main as cli
from omnijet_lib.io import OmnijetError
from omnijet_lib.training.gpt import GPT_FILE, load_gpt

TINY = {"tokenizer": {"epochs": 1, "batch_size": 64,
                      "model_kw": {"hidden_dim": 8, "num_blocks": 1, "num_heads": 2, "mlp_hidden": 8}},
        "backbone": {"gpt_config": {"n_embd": 16, "n_head": 2, "n_layer": 1, "ffn": 32}, "epochs": 1,
                     "batch_size": 32},
        "trainer": {"accelerator": "cpu"}, "torch_threads": 1}


def tiny_profile(path: Path, real_path: Path, models: Path, **backbone) -> Path:
    common = {**TINY, "data_files": str(real_path), "models_dir": str(models),
              "backbone": {**TINY["backbone"], **backbone}}
    path.write_text(yaml.safe_dump({"common": common, "02_generation": {"num_codes": 16}}))
    return path


def test_train_gives_the_runs_the_notebooks_reuse(real_path, tmp_path, capsys):
    from omnijet_lib.figures import section_parameters
    from omnijet_lib.studies.generation import backbone_data, profile_backbone
    from omnijet_lib.studies.tokens import profile_tokenizer, tokenizer_data
    from omnijet_lib.training.store import ModelStore

    profile = tiny_profile(tmp_path / "p.yaml", real_path, tmp_path / "models")
    here = os.getcwd()
    assert cli(["train", "backbone", "--profile", str(profile), "--name", "top"]) == 0
    out, err = capsys.readouterr()
    assert os.getcwd() == here  # the command works in notebooks/ and comes back
    run = Path(out.strip())
    assert run.parent.name == "gpt_top" and (run / GPT_FILE).is_file()
    assert "tokenizer_conditional_16: training" in err and "gpt_top: training" in err
    # notebook 02's own requests, with the same parameters, find exactly these runs
    p = section_parameters(profile, "02_generation")
    store = ModelStore(p["models_dir"], reuse="strict", progress=lambda m: None)
    tok, tok_run = profile_tokenizer(store, "conditional", 16, tokenizer_data(p["tokenizer"], p["data_files"],
                                                                             p["per_class"], p["seed"], p["trainer"]))
    _, gpt_run = profile_backbone(store, "top", tok, tok_run, backbone_data(p["backbone"], p["data_files"],
                                                                            p["per_class"], p["seed"], p["trainer"]))
    assert gpt_run.path == run and not gpt_run.trained
    assert cli(["train", "backbone", "--profile", str(profile), "--name", "top"]) == 0
    assert "gpt_top: reusing" in capsys.readouterr().err


@pytest.mark.parametrize("extra, fragment", [
    (["--precision", "17-fancy"], "precision"),
    (["--section", "09_nothing"], "--section 09_nothing: no such notebook"),
    (["--shards", "/nonexistent/shards"], "no shard manifest"),
])
def test_train_refuses_bad_options_in_one_line(extra, fragment, real_path, tmp_path, capsys):
    profile = tiny_profile(tmp_path / "p.yaml", real_path, tmp_path / "models")
    assert cli(["train", "backbone", "--profile", str(profile), *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "models").exists()


def ddp_command(profile, shards) -> list[str]:
    """What examples/slurm/pretrain_backbone.sbatch runs, for 2 CPU processes on one node."""
    return ["train", "backbone", "--profile", str(profile), "--shards", str(shards), "--accelerator", "cpu",
            "--devices", "2", "--num-nodes", "1", "--strategy", "ddp"]


def sbatch_commands(name: str) -> list[list[str]]:
    """The ``srun omnijet ...`` command lines of an example job script, as argument lists."""
    text = (Path(__file__).resolve().parents[1] / "examples" / "slurm" / name).read_text().replace("\\\n", " ")
    return [shlex.split(line)[2:] for line in text.splitlines() if line.startswith("srun omnijet ")]


def options(argv) -> list[str]:
    return [a.split("=")[0] for a in argv if a.startswith("--")]


def test_the_slurm_examples_run_the_tested_command_lines():
    from test_finetune_cli import CLASSIFY_OPTIONS, FINETUNE_OPTIONS

    (pretrain,) = sbatch_commands("pretrain_backbone.sbatch")
    assert pretrain[:2] == ["train", "backbone"] and options(pretrain) == options(ddp_command("P", "S"))
    finetune, classify = sbatch_commands("finetune.sbatch")
    assert finetune[0] == "finetune" and options(finetune) == FINETUNE_OPTIONS
    assert classify[0] == "classify" and options(classify) == CLASSIFY_OPTIONS


def _rank_shards(log: str) -> dict[int, set[str]]:
    """{rank: shards} of epoch 0 from the training log."""
    found = re.findall(r"rank (\d)/2 epoch 0: \d+ shards: ((?:[\w.]+?\.npz ?)+)", log)
    return {int(r): set(names.split()) for r, names in found}


def test_two_process_ddp_from_the_command_line_streams_disjoint_shards_and_resumes(real_path, tmp_path, capsys):
    """The command lines of examples/slurm/pretrain_backbone.sbatch, with gloo on 2 CPU processes."""
    profile = tiny_profile(tmp_path / "p.yaml", real_path, tmp_path / "models", epochs=60, batch_size=8)
    assert cli(["train", "tokenizer", "--profile", str(profile)]) == 0
    tok = Path(capsys.readouterr().out.strip()) / "tokenizer.safetensors"
    shards = tmp_path / "shards"
    assert cli(["tokenize", "--tokenizer", str(tok), "--in", str(real_path), "--out", str(shards),
                "--chunk", "50", "--classes", "QCD", "Tbqq", "--device", "cpu"]) == 0
    names = {s["name"] for s in json.loads((shards / "manifest.json").read_text())["shards"]}
    assert len(names) == 10
    command = [sys.executable, "-m", "omnijet_lib.cli", *ddp_command(profile, shards)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # first attempt: killed (rank 0, rank 1 and the launcher) once an epoch has been checkpointed
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    runs = tmp_path / "models" / "gpt_combined"
    deadline = time.time() + 300
    while not list(runs.glob("*/last.ckpt")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    _, log1 = first.communicate()
    assert list(runs.glob("*/last.ckpt")), log1[-2000:]
    run = next(runs.glob("*/"))
    assert not json.loads((run / "run.json").read_text())["complete"] and not (run / GPT_FILE).exists()
    split = _rank_shards(log1)
    assert set(split) == {0, 1} and not split[0] & split[1] and split[0] | split[1] == names, log1[-2000:]
    # the same command again resumes the run and finishes it
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "gpt_combined: resuming in" in second.stderr
    assert Path(second.stdout.strip().splitlines()[-1]) == run.resolve()
    record = json.loads((run / "run.json").read_text())
    assert record["complete"] and record["settings"]["streamed"] and record["settings"]["trainer"]["devices"] == 2
    assert len(record["data"]["source"]["shards"]) == 10
    gpt = load_gpt(run / GPT_FILE, vocab_size=18)
    assert gpt.config.n_embd == 16
    # a profile naming the shards gives the notebooks this very run; shards of another tokenizer are refused
    from omnijet_lib.figures import section_parameters
    from omnijet_lib.studies.generation import backbone_data, profile_backbone
    from omnijet_lib.studies.tokens import profile_tokenizer, tokenizer_data
    from omnijet_lib.training.store import ModelStore

    p = section_parameters(profile, "02_generation")
    store = ModelStore(p["models_dir"], reuse="strict", progress=lambda m: None)
    tok_model, tok_run = profile_tokenizer(store, "conditional", 16, tokenizer_data(
        p["tokenizer"], p["data_files"], p["per_class"], p["seed"], p["trainer"]))
    backbone = {**p["backbone"], "shards": str(shards), "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}}
    data = backbone_data(backbone, p["data_files"], p["per_class"], p["seed"], p["trainer"], load=False)
    assert profile_backbone(store, "combined", tok_model, tok_run, data)[1].path == run
    other = tok_run.__class__(tok_run.path, "0" * 16, False, 0.0)
    with pytest.raises(OmnijetError, match="not with the profile's tokenizer"):
        profile_backbone(store, "combined", tok_model, other, data)


def test_train_epicfm_is_notebook_04s_model_and_profile_paths_are_the_notebooks(real_path, tmp_path, capsys):
    from omnijet_lib.datasets import load_dataset
    from omnijet_lib.figures import NOTEBOOKS, section_parameters
    from omnijet_lib.studies.generation import profile_epic_fm
    from omnijet_lib.training.store import ModelStore

    models = tmp_path / "models"
    profile = tmp_path / "p.yaml"
    # a models_dir relative to notebooks/, as the profiles write them
    profile.write_text(yaml.safe_dump({"common": {"data_files": str(real_path), "models_dir": os.path.relpath(models, NOTEBOOKS)},
                                       "04_epic_fm_comparison": {"epochs": 1, "batch_size": 16}}))
    assert cli(["train", "epicfm", "--config", str(profile), "--accelerator", "cpu"]) == 0
    out, err = capsys.readouterr()
    run = Path(out.strip())
    assert run.parent == models / "epic_fm_top" and (run / "run.json").is_file() and "epic_fm_top: training" in err
    p = section_parameters(profile, "04_epic_fm_comparison")
    p["trainer"] = {"accelerator": "cpu"}
    jets = load_dataset(p["data_files"], per_class=p["per_class"], seed=p["seed"], classes=["Tbqq"])
    _, again = profile_epic_fm(ModelStore(models, reuse="strict", progress=lambda m: None), jets, p["data_files"],
                               p["per_class"], p["seed"], p["epic_config"], p["epochs"], p["batch_size"], p["trainer"])
    assert again.path == run and not again.trained

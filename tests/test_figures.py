"""The papermill runner validates profiles before running anything."""

import os
import pytest

from omnijet_lib.figures import load_profile, notebooks, resolve_parameters
from omnijet_lib.io import OmnijetError


def test_profiles_validate_against_notebooks():
    for name in ("ci", "quick", "paper", "published"):
        plan = resolve_parameters(load_profile(name), notebooks())
        assert plan and all(isinstance(p, dict) for p in plan.values())


def test_unknown_common_key_is_an_error(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("common:\n  per_clas: 10\n")
    with pytest.raises(OmnijetError, match="per_clas not declared by any notebook"):
        resolve_parameters(load_profile(p), notebooks())


def test_unknown_notebook_key_and_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("00_dataset:\n  epochs: 3\n")
    with pytest.raises(OmnijetError, match="00_dataset has no parameter"):
        resolve_parameters(load_profile(p), notebooks())
    p.write_text("99_nothing:\n  a: 1\n")
    with pytest.raises(OmnijetError, match="section '99_nothing' names no notebook"):
        resolve_parameters(load_profile(p), notebooks())


def test_bad_yaml_and_negative_values(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("common:\n  per_class: [1, 2\n")
    with pytest.raises(OmnijetError, match=r"broken.yaml: line \d+ invalid YAML"):
        load_profile(p)
    p.write_text("common:\n  per_class: -5\n")
    with pytest.raises(OmnijetError, match="per_class must be positive, got -5"):
        resolve_parameters(load_profile(p), notebooks())
    with pytest.raises(OmnijetError, match="profile not found"):
        load_profile("no_such_profile")


def test_values_of_per_key_parameters_are_checked_too(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("02_generation:\n  n_generate_per_model: {combined: 0}\n")
    with pytest.raises(OmnijetError, match=r"02_generation: n_generate_per_model must be positive, got \{'combined': 0\}"):
        resolve_parameters(load_profile(p), notebooks())
    p.write_text("common:\n  tokenizer: {extra_per_class: -3}\n")
    with pytest.raises(OmnijetError, match="tokenizer must not be negative"):
        resolve_parameters(load_profile(p), notebooks())
    p.write_text("common:\n  tokenizer: {extra_per_class: 0, per_size: {64: {extra_per_class: 10}}}\n")
    assert resolve_parameters(load_profile(p), notebooks())  # 0 extra jets is meaningful


def test_dry_run_says_whether_the_published_checkpoints_are_there(tmp_path):
    import official_format as of

    from omnijet_lib.figures import estimate_cost

    params = {"checkpoint_dir": str(tmp_path / "none"), "per_class": 10, "kinds": ["conditional"]}
    lines = estimate_cost("01_token_quality", params)["lines"]
    assert any(line.startswith("checkpoint_dir: MISSING") and "omnijet checkpoints fetch --dest" in line for line in lines)
    of.fixture_archive(tmp_path / "ckpt")
    lines = estimate_cost("01_token_quality", {**params, "checkpoint_dir": str(tmp_path / "ckpt")})["lines"]
    assert any("published tokenizer and backbone found" in line for line in lines)


def test_progress_line_names_the_running_cell(tmp_path):
    import json
    import time

    from omnijet_lib.figures import _Progress, progress_line

    nb = tmp_path / "01.ipynb"
    assert progress_line("01", nb, 5) == "[01] starting, 5 s elapsed"
    cells = [{"cell_type": "markdown"}] + [
        {"cell_type": "code", "metadata": {"papermill": {"status": s}}}
        for s in ("completed", "completed", "running", "pending", "pending")]
    nb.write_text(json.dumps({"cells": cells}))
    assert progress_line("01", nb, 754) == "[01] cell 3/5 running, 12:34 min elapsed"
    nb.write_text('{"cells": [')  # caught while papermill writes it
    assert progress_line("01", nb, 61) == "[01] starting, 1:01 min elapsed"

    lines = []
    import builtins
    real_print = builtins.print
    builtins.print = lambda *a, **k: lines.append(" ".join(map(str, a)))
    try:
        with _Progress("01", nb, every=0.05):
            time.sleep(0.3)
    finally:
        builtins.print = real_print
    assert len(lines) >= 3 and all(line.startswith("[01] starting") for line in lines)


def _tokenizer_costs(stem, p, n=1000, what=2):
    from omnijet_lib.figures import _cost_runs

    return {label.split(" (")[0]: run[what] for run in _cost_runs(stem, p, n) for label in [run[0]]
            if label.startswith("VQ-VAE")}


def test_cost_counts_epochs_per_codebook_size():
    p = {"kinds": ["conditional"], "codebook_sizes": [512, 8192], "tokenizer": {"epochs": 8,
                                                                               "per_size": {8192: {"epochs": 16}}}}
    assert _tokenizer_costs("01_token_quality", p, what=3) == {"VQ-VAE conditional K=512": 8,
                                                               "VQ-VAE conditional K=8192": 16}


def test_cost_counts_the_extra_tokenizer_jets_of_a_codebook_size():
    from omnijet_lib.figures import _cost_runs
    from omnijet_lib.io import OmnijetError

    p = {"kinds": ["conditional", "unconditional"], "codebook_sizes": [512, 8192], "per_class": 100,
         "tokenizer": {"per_size": {8192: {"extra_per_class": 200}}}}
    assert _tokenizer_costs("01_token_quality", p) == {
        "VQ-VAE conditional K=512": pytest.approx(540), "VQ-VAE conditional K=8192": pytest.approx(2340),
        "VQ-VAE unconditional K=512": pytest.approx(540), "VQ-VAE unconditional K=8192": pytest.approx(2340)}
    with pytest.raises(OmnijetError, match=r"^tokenizer.per_size: 4096 not among 512, 8192$"):
        _cost_runs("01_token_quality", {**p, "tokenizer": {"per_size": {4096: {"epochs": 2}}}}, 1000)


def test_every_notebook_counts_the_same_profile_tokenizer():
    """02-05 ask for the tokenizer 01 trains: one definition, whichever notebook needs it first."""
    tok = {"per_class": 100, "epochs": 7, "batch_size": 64}
    costs = [_tokenizer_costs(stem, {"per_class": 5000, "num_codes": 512, "codebook_sizes": [512],
                                     "kinds": ["conditional"], "tokenizer": tok}, what=slice(2, 5))
             for stem in ("01_token_quality", "02_generation", "04_epic_fm_comparison", "05_token_explorer")]
    assert all(c == {"VQ-VAE conditional K=512": (pytest.approx(540), 7, 64)} for c in costs), costs


def test_every_notebook_counts_the_same_profile_backbone():
    """02-04 ask for the backbones 02 trains: one definition, with per-model epochs and data scaling."""
    from omnijet_lib.figures import _cost_runs

    bb = {"per_class": 100, "epochs": 8, "batch_size": 16, "per_model": {"top": {"epochs": 16, "dropout": 0.1}}}
    p = {"per_class": 5000, "backbone": bb, "scaling_fractions": [0.5]}

    def gpts(stem):
        return {label.split(" (")[0]: (n, e, b) for label, model, n, e, b, *_ in _cost_runs(stem, p, 1000)
                if model == "gpt"}
    two = gpts("02_generation")
    assert two == {"GPT combined": (pytest.approx(180), 8, 16), "GPT qcd": (pytest.approx(90), 8, 16),
                   "GPT top": (pytest.approx(90), 16, 16), "GPT combined on 0.5 of its jets": (pytest.approx(90), 16, 16)}
    assert gpts("03_transfer_learning") == {"GPT combined": two["GPT combined"]}
    assert gpts("04_epic_fm_comparison") == {"GPT top": two["GPT top"]}


def test_cost_counts_the_jets_each_backbone_generates():
    from omnijet_lib.figures import _cost_runs

    p = {"n_generate": 200, "n_generate_per_model": {"combined": 600},
         "scaling_fractions": [0.5], "classifier_seeds": [0, 1]}
    jets = {label: n for label, _, n, *_ in _cost_runs("02_generation", p, 1000)}
    assert jets["generation of 1600 jets"] == 1600   # 600 + 200 + 200, and the scaling backbone's 600
    assert jets["classifier test x2 seeds"] == pytest.approx(0.6 * 2 * 1600 * 2)


def test_per_model_settings_must_map_names_to_their_types():
    from omnijet_lib.figures import _cost_runs, check_parameter
    from omnijet_lib.io import OmnijetError

    check_parameter("quick.yaml common", "backbone", {"per_model": {"top": {"epochs": 16, "dropout": 0.1}}}, {})
    check_parameter("quick.yaml 02_generation", "n_generate_per_model", {"combined": 4000}, {})
    check_parameter("quick.yaml common", "tokenizer", {"per_size": {8192: {"model_kw": {"dropout": 0.0}}}}, {})
    with pytest.raises(OmnijetError, match=r"tokenizer.per_size.8192 must be dict"):
        check_parameter("quick.yaml common", "tokenizer", {"per_size": {8192: 0.0}}, {})
    with pytest.raises(OmnijetError, match=r"tokenizer.per_size.8192.extra_per_class must be int"):
        check_parameter("quick.yaml common", "tokenizer", {"per_size": {8192: {"extra_per_class": 0.5}}}, {})
    with pytest.raises(OmnijetError, match=r"^quick.yaml common: backbone.per_model.top.dropout must be float"):
        check_parameter("quick.yaml common", "backbone", {"per_model": {"top": {"dropout": "0.1"}}}, {})
    with pytest.raises(OmnijetError, match=r"^quick.yaml common: backbone.per_model.top.epoch: unknown key; known: epochs, dropout$"):
        check_parameter("quick.yaml common", "backbone", {"per_model": {"top": {"epoch": 16}}}, {})
    with pytest.raises(OmnijetError, match=r"^quick.yaml common: backbone.gpt_config.n_emb: unknown key; known: n_embd, "):
        check_parameter("quick.yaml common", "backbone", {"gpt_config": {"n_emb": 64}}, {})
    check_parameter("quick.yaml 06_density", "sampler_settings", [{}, {"top_k": 5}, {"top_p": 0.9}], [{}])
    with pytest.raises(OmnijetError, match=r"^quick.yaml 06_density: sampler_settings\[1\].topk: unknown key; known: top_k, "):
        check_parameter("quick.yaml 06_density", "sampler_settings", [{}, {"topk": 5}], [{}])
    with pytest.raises(OmnijetError, match=r"^quick.yaml 06_density: sampler_settings\[0\].top_k must be int"):
        check_parameter("quick.yaml 06_density", "sampler_settings", [{"top_k": "5"}], [{}])
    check_parameter("quick.yaml 06_density", "density_sizes", {"small": {"n_embd": 64, "n_layer": 2}}, {})
    with pytest.raises(OmnijetError, match=r"^quick.yaml 06_density: density_sizes.small.n_emb: unknown key; known: n_embd, "):
        check_parameter("quick.yaml 06_density", "density_sizes", {"small": {"n_emb": 64}}, {})
    with pytest.raises(OmnijetError, match=r"^quick.yaml 06_density: density_sizes.small must be dict"):
        check_parameter("quick.yaml 06_density", "density_sizes", {"small": 64}, {})
    with pytest.raises(OmnijetError, match=r"^backbone.per_model: tops not among qcd, top, combined, all, QCD, "):
        _cost_runs("02_generation", {"backbone": {"per_model": {"tops": {"epochs": 16}}}}, 1000)


def test_per_key_overrides_match_keys_as_text_and_reject_unknown_ones():
    from omnijet_lib.figures import _cost_runs
    from omnijet_lib.io import value_per_key

    # papermill hands {8192: 16} to the notebook as {"8192": 16}
    assert value_per_key("tokenizer.per_size", {"8192": 16}, [512, 8192], 8) == {512: 8, 8192: 16}
    assert value_per_key("n_generate_per_model", None, ["qcd", "top"], 8) == {"qcd": 8, "top": 8}
    with pytest.raises(OmnijetError, match=r"^n_generate_per_model: tops not among qcd, top, combined$"):
        value_per_key("n_generate_per_model", {"tops": 16}, ["qcd", "top", "combined"], 8)
    with pytest.raises(OmnijetError, match=r"^tokenizer.per_size: 4096 not among 512, 8192$"):
        _cost_runs("01_token_quality", {"kinds": ["conditional"], "codebook_sizes": [512, 8192],
                                        "tokenizer": {"per_size": {"4096": {"epochs": 16}}}}, 1000)


def test_parallel_run_keeps_the_notebook_order_and_stops_after_a_failure(tmp_path, capsys, monkeypatch):
    import sys
    from pathlib import Path

    from omnijet_lib import figures

    monkeypatch.setattr(figures.os, "cpu_count", lambda: 2)
    log = tmp_path / "log"
    nbs = {tmp_path / f"{n}_x.ipynb": {} for n in ("00", "01", "02", "03", "04", "05")}
    fail = {"05"}

    def command(nb):  # a stand-in notebook: logs start/end and its thread count; 02 is slow, 05 fails
        stem = nb.stem[:2]
        return [sys.executable, "-c", (
            "import os, time\n"
            f"open({str(log)!r}, 'a').write('start {stem} ' + os.environ['OMP_NUM_THREADS'] + '\\n')\n"
            f"print('[{stem}] working', flush=True); time.sleep(0.3 if '{stem}' != '02' else 1.5)\n"
            f"open({str(log)!r}, 'a').write('end {stem}\\n')\n"
            + (f"print('error: {stem}_x.ipynb: cell 2 failed (ValueError: bad)'); raise SystemExit(1)\n"
               if stem in fail else ""))]

    with pytest.raises(OmnijetError, match=r"^05_x.ipynb: cell 2 failed \(ValueError: bad\) \(not started: 04_x\)$"):
        figures.run_parallel(Path("p.yaml"), nbs, tmp_path, jobs=2, command=command)
    events = log.read_text().split("\n")[:-1]
    order = [e.split()[:2] for e in events]
    pos = {tuple(e): i for i, e in enumerate(order)}
    assert pos["start", "01"] > pos["end", "00"] and pos["start", "02"] > pos["end", "01"]  # NEEDS kept
    assert pos["start", "05"] < pos["end", "02"]  # 05 does not wait for 02 (nor for 04, listed first)
    assert ("start", "04") not in pos           # needs 02, which was still running when 05 failed
    threads = {e.split()[1]: e.split()[2] for e in events if e.startswith("start")}
    assert threads["00"] == threads["01"] == "2" and threads["02"] == threads["03"] == "1"
    running = 0
    for kind, _ in order:                       # never more than two at once
        running += 1 if kind == "start" else -1
        assert running <= 2
    out = capsys.readouterr().out
    assert "[02] working" in out and "error:" not in out


def test_each_profile_writes_its_own_gallery(tmp_path, capsys):
    """make figures (ci) never writes over the committed quick gallery: figures/<profile>/."""
    from omnijet_lib.figures import FIGURES, NOTEBOOKS, main

    mine = tmp_path / "mine.yaml"
    mine.write_text("common: {per_class: 300}\n05_token_explorer: {figures_dir: /somewhere/else}\n")
    for profile, stem in (("ci", "ci"), (str(mine), "mine")):
        main(["--profile", profile, "--dry-run", "--only", "00", "05"])
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[0")]
        default = f"figures_dir={os.path.relpath(FIGURES / stem, NOTEBOOKS)}"
        assert default in lines[0] and default == "figures_dir=../figures/" + stem
        assert ("figures_dir=/somewhere/else" in lines[1]) == (stem == "mine")  # a profile's own choice wins
        assert "figures_dir=../figures/quick" not in "".join(lines)

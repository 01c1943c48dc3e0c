"""The ``published`` profile end to end at ci size, on the published archive's layout and names
built from the tiny official-format fixtures (tests/official_format.py)."""

import json
import re

import yaml

import official_format as of
from omnijet_lib.figures import PARAMS, run_figures

# What makes the profile "published"; every size in it reverts to the notebooks' ci defaults.
KEEP = {"checkpoint_dir", "kinds", "epic_config", "scaling_fractions"}  # the published profile trains no backbone


def test_published_profile_at_ci_size(tmp_path, capfd):
    archive = of.fixture_archive(tmp_path / "checkpoints")
    profile = yaml.safe_load((PARAMS / "published.yaml").read_text())
    small = {section: {k: v for k, v in keys.items() if k in KEEP} for section, keys in profile.items()}
    small["common"].update(checkpoint_dir=str(archive), models_dir=str(tmp_path / "models"),
                           figures_dir=str(tmp_path / "figures"))
    path = tmp_path / "published_ci.yaml"
    path.write_text(yaml.safe_dump(small))
    done = run_figures(str(path), only=["01", "02", "03", "04", "05"], out_dir=tmp_path / "executed", progress_every=5)
    assert [p.name[:2] for p in done] == ["01", "02", "03", "04", "05"]
    out, err = capfd.readouterr()  # progress while a notebook runs, the total, no kernel transport warning
    assert re.search(r"\[04_epic_fm_comparison\] cell \d+/\d+ running, .* elapsed", out), out[-2000:]
    assert "5 notebook(s) done in" in out and "without encryption" not in out + err

    metrics = {n: json.loads((tmp_path / "figures" / f"{n}_metrics.json").read_text()) for n in ("01", "02", "03", "04", "05")}
    models = tmp_path / "models"
    assert "conditional 32" in metrics["01"]["tokenizers"]  # the published tokenizer, not one trained here
    assert not (models / "tokenizer_conditional_32").exists()
    assert list(metrics["02"]["models"]) == ["combined"] and metrics["02"]["vocab_size"] == 34
    assert metrics["02"]["gpt_config"]["n_embd"] == 16 and metrics["02"]["models"]["combined"]["train_seconds"] == 0
    assert [p["fraction"] for p in metrics["02"]["data_scaling"]] == [1.0]  # no backbone trained on subsets
    assert metrics["05"]["num_codes"] == 32
    # converted once into the store: one complete run each, named by the notebooks that use it
    runs = {p.parent.parent.name: json.loads(p.read_text()) for p in models.glob("published_*/*/run.json")}
    assert sorted(runs) == ["published_gpt_combined", "published_tokenizer"]
    assert len(list(models.glob("published_*/*/"))) == 2  # no other run of them
    assert all(r["complete"] for r in runs.values())
    assert runs["published_gpt_combined"]["data"]["checkpoint"]["file"] == f"{of.BACKBONE_DIR}/{of.BACKBONE_NAME}"
    assert all(runs["published_tokenizer"]["settings_hash"] in json.dumps(metrics[n]) for n in ("02", "03", "04", "05"))
    assert all(runs["published_gpt_combined"]["settings_hash"] in json.dumps(metrics[n]) for n in ("02", "03", "04"))

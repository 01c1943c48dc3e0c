"""The model store's one rule: reuse only a run trained with exactly the requested settings on
exactly the requested data; train the others into their own run folder, or refuse them (strict)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omnijet_lib.io import OmnijetError
from omnijet_lib.training.store import ModelRequest, ModelStore, data_identity


class Trainer:
    """Counts trainings; a 'model' is the text of the file it writes."""

    def __init__(self):
        self.calls = []

    def train(self, run_dir):
        self.calls.append(run_dir)
        (run_dir / "model.txt").write_text(f"model {len(self.calls)}")
        return f"model {len(self.calls)}"

    @staticmethod
    def load(run_dir):
        return (run_dir / "model.txt").read_text()


@pytest.fixture
def x():
    return np.arange(24, dtype=np.float32).reshape(2, 4, 3)


def request(x, **settings):
    return ModelRequest("tokenizer_conditional_64", {"hidden_dim": 32, "epochs": 2, "seed": 1, **settings},
                        data_identity({"simulation": {"per_class": 300, "seed": 1}}, x))


def test_unchanged_settings_train_nothing(tmp_path, x):
    store, t = ModelStore(tmp_path, progress=lambda m: None), Trainer()
    model, run = store.get(request(x), t.train, t.load)
    again, run2 = store.get(request(x), t.train, t.load)
    assert len(t.calls) == 1 and model == again == "model 1"
    assert run.trained and not run2.trained and run.path == run2.path
    assert run.path == tmp_path / "tokenizer_conditional_64" / run.settings_hash
    rec = json.loads((run.path / "run.json").read_text())
    assert rec["complete"] and rec["settings"]["hidden_dim"] == 32 and rec["data"]["jets"] == 2
    assert store.plan(request(x)) == "reuse"


@pytest.mark.parametrize("change", [{"hidden_dim": 64}, {"seed": 2}, {"epochs": 3}, {"new_setting": True}])
def test_a_changed_setting_trains_a_new_model_and_keeps_the_old(tmp_path, x, change):
    store, t = ModelStore(tmp_path, progress=lambda m: None), Trainer()
    _, old = store.get(request(x), t.train, t.load)
    model, new = store.get(request(x, **change), t.train, t.load)
    assert model == "model 2" and new.path != old.path and (old.path / "model.txt").read_text() == "model 1"
    assert store.get(request(x), t.train, t.load)[0] == "model 1"  # a change back reuses the old one
    assert len(t.calls) == 2


def test_changed_data_trains_a_new_model(tmp_path, x):
    store, t = ModelStore(tmp_path, progress=lambda m: None), Trainer()
    store.get(request(x), t.train, t.load)
    other = x.copy()
    other[0, 0, 0] += 1  # one number of the jets differs
    files = ModelRequest("tokenizer_conditional_64", request(x).settings, data_identity({"files": ["a.root"]}, x))
    store.get(ModelRequest("tokenizer_conditional_64", request(x).settings,
                           data_identity({"simulation": {"per_class": 300, "seed": 1}}, other)), t.train, t.load)
    store.get(files, t.train, t.load)  # same arrays, another source
    assert len(t.calls) == 3


def test_strict_refuses_naming_the_first_difference(tmp_path, x):
    store, t = ModelStore(tmp_path, progress=lambda m: None), Trainer()
    _, run = store.get(request(x), t.train, t.load)
    strict = ModelStore(tmp_path, reuse="strict", progress=lambda m: None)
    assert strict.get(request(x), t.train, t.load)[0] == "model 1"  # a match is reused
    with pytest.raises(OmnijetError) as err:
        strict.get(request(x, hidden_dim=128), t.train, t.load)
    msg = str(err.value)
    assert "\n" not in msg and msg == (f"{tmp_path / 'tokenizer_conditional_64'}: reuse: strict, and no run was trained "
                                       f"with these settings: settings.hidden_dim is 32 in {run.path}, 128 requested")
    with pytest.raises(OmnijetError, match="no finished run of it exists"):
        strict.get(ModelRequest("gpt_top", {}, {}), t.train, t.load)
    assert len(t.calls) == 1


def test_an_interrupted_training_resumes_in_its_folder(tmp_path, x):
    store, t = ModelStore(tmp_path, progress=lambda m: None), Trainer()

    def crash(run_dir):
        (run_dir / "last.ckpt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.get(request(x), crash, t.load)
    assert store.plan(request(x)) == "resume"
    seen = []
    model, run = store.get(request(x), lambda d: seen.append((d / "last.ckpt").read_text()) or t.train(d), t.load)
    assert seen == ["half"] and run.trained and model == "model 1"


def test_a_record_that_disagrees_with_its_folder_is_refused(tmp_path, x):
    store, t = ModelStore(tmp_path, progress=lambda m: None), Trainer()
    _, run = store.get(request(x), t.train, t.load)
    rec = json.loads((run.path / "run.json").read_text())
    (run.path / "run.json").write_text(json.dumps({**rec, "settings": {**rec["settings"], "hidden_dim": 1}}))
    with pytest.raises(OmnijetError, match="records other settings than its folder's hash says"):
        store.get(request(x), t.train, t.load)


def test_bad_names_and_modes(tmp_path):
    with pytest.raises(OmnijetError, match="reuse must be one of auto, strict"):
        ModelStore(tmp_path, reuse="sometimes")
    with pytest.raises(OmnijetError, match="plain folder name"):
        ModelRequest("../escape", {}, {})

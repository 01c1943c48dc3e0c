"""Safe loading: a checkpoint from the internet must not be able to run code.

The payload is a pickle whose ``__reduce__`` opens (creates) a marker file when unpickled. A
positive control shows that plain unpickling does create the marker; every loader of the
package must refuse the file with a clear one-line error and leave no marker behind.
"""

from __future__ import annotations

import ast
import builtins
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from omnijet_lib.io import load_checkpoint, safe_torch_load
from omnijet_lib.training import TrainConfig
from omnijet_lib.io import load_model

from .conftest import REPO, one_line_error, snapshot
from .test_bad_inputs import TinyConfig, TinyNet


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the pickle's code ran"


def _torch_payload(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "hook": Payload(marker)}, path)
    return path


def test_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Positive control (not the package): unrestricted unpickling runs the payload."""
    m = tmp_path / "control"
    p = _torch_payload(tmp_path / "evil.ckpt", m)
    torch.load(p, weights_only=False)
    assert m.exists()


def test_safe_torch_load_refuses_code_in_a_torch_checkpoint(tmp_path, marker):
    p = _torch_payload(tmp_path / "evil.ckpt", marker)
    with one_line_error(f"{p}: refused to load, the pickle holds Python objects beyond tensors",
                        "could run code (it references io.open)", unchanged=tmp_path):
        safe_torch_load(p)


def test_safe_torch_load_refuses_a_raw_pickle(tmp_path, marker):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"w": Payload(marker)}))
    with one_line_error(f"{p}: refused to load", "could run code", unchanged=tmp_path):
        safe_torch_load(p)


@pytest.mark.parametrize("content", [b"", b"hello world", b"PK\x03\x04 not really a zip"])
def test_safe_torch_load_unreadable_files(tmp_path, content):
    p = tmp_path / "junk.ckpt"
    p.write_bytes(content)
    with one_line_error(f"{p}: not a readable torch checkpoint", unchanged=tmp_path):
        safe_torch_load(p)


def test_safe_torch_load_still_loads_tensors(tmp_path):
    p = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3), "meta": {"epoch": 2, "name": "x"}}, p)
    out = safe_torch_load(p)
    assert torch.equal(out["w"], torch.arange(3)) and out["meta"] == {"epoch": 2, "name": "x"}


def test_pickle_disguised_as_safetensors_is_refused(tmp_path, marker):
    p = _torch_payload(tmp_path / "model.safetensors", marker)
    with one_line_error(f"{p}: not a valid safetensors checkpoint", unchanged=tmp_path):
        load_checkpoint(p)
    with one_line_error(f"{p}: not a valid safetensors checkpoint", unchanged=tmp_path):
        load_model(p, TinyNet, TinyConfig)


def _toy_fit(out_dir: Path, epochs: int = 1):
    from omnijet_lib.models.deepsets import DeepSets, DeepSetsConfig
    from omnijet_lib.training.classifier import train_classifier

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6, 3)).astype(np.float32)
    mask = np.ones((32, 6), bool)
    labels = rng.integers(0, 2, 32)
    return train_classifier(DeepSets(DeepSetsConfig(n_classes=2, phi=[8], f=[8])), x, mask, labels,
                            out_dir=out_dir, batch_size=16,
                            train_config=TrainConfig(max_epochs=epochs, progress_bar=False))


def test_fit_refuses_to_resume_from_a_last_ckpt_carrying_code(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    _torch_payload(run / "last.ckpt", marker)
    with one_line_error(f"{run / 'last.ckpt'}: refused to load", "could run code",
                        "cannot resume from it (delete it to start afresh)", unchanged=tmp_path):
        _toy_fit(run)


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b""])
def test_fit_refuses_a_corrupt_last_ckpt_with_one_line(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_bytes(content)
    with one_line_error(f"{run / 'last.ckpt'}: not a readable torch checkpoint",
                        "cannot resume from it", unchanged=tmp_path):
        _toy_fit(run)


def test_fit_refuses_a_last_ckpt_that_is_not_a_lightning_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"w": torch.ones(2)}, run / "last.ckpt")
    with one_line_error(f"{run / 'last.ckpt'}: not a Lightning checkpoint (no state_dict)", unchanged=tmp_path):
        _toy_fit(run)


# --------------------------------------------------------------------- static guard
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            yield owner, node.func.attr, kw, node.lineno


def _sources():
    for p in sorted((REPO / "omnijet_lib").rglob("*.py")):
        yield p, p.read_text()
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield nb, "\n".join(ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!")))


def test_no_unsafe_deserialisation_in_the_package_or_notebooks():
    """Every ``torch.load`` passes ``weights_only=True`` or the restricted unpickler of
    omnijet_lib.official (``pickle_module=_RESTRICTED_PICKLE``, tested in test_official_checkpoints);
    no ``pickle.load(s)``; no ``np.load(..., allow_pickle=True)``."""
    bad = []
    for path, src in _sources():
        for owner, attr, kw, line in _calls(ast.parse(src)):
            where = f"{path.relative_to(REPO)}:{line}"
            if owner == "torch" and attr == "load":
                wo, pm = kw.get("weights_only"), kw.get("pickle_module")
                restricted = isinstance(pm, ast.Name) and pm.id == "_RESTRICTED_PICKLE"
                if not (isinstance(wo, ast.Constant) and wo.value is True) and not restricted:
                    bad.append(f"{where} torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill", "joblib") and attr in ("load", "loads"):
                bad.append(f"{where} {owner}.{attr}")
            if owner in ("np", "numpy") and attr == "load":
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    bad.append(f"{where} np.load(allow_pickle=True)")
    assert not bad, "\n".join(bad)

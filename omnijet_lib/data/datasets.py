"""Where notebooks get their jets: the embedded simulated default, or any JetClass-schema files."""

from __future__ import annotations

import os
from pathlib import Path

import awkward as ak

from .jetclass import read_jetclass

__all__ = ["REPO", "data_root", "real_sample_path", "load_dataset"]

REPO = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """Cache folder for simulated data, tokens and models: ``$OMNIJET_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("OMNIJET_DATA", REPO / "data"))


def real_sample_path() -> Path | None:
    """The 500 real JetClass jets shipped beside the repository (``../shared``), if present."""
    p = REPO.parent / "shared" / "data" / "jetclass_real_500.root"
    return p if p.is_file() else None


def load_dataset(data_files=None, per_class: int = 300, seed: int = 1, classes=None,
                 max_jets: int | None = None, workers: int = 2) -> ak.Array:
    """Jets from ``data_files`` (path, glob or list of JetClass-schema files) or, when ``None``,
    from the embedded Pythia 8 simulation (``per_class`` jets per class, cached by settings)."""
    if data_files is None:
        from .simulate import default_dataset

        data_files = str(default_dataset(per_class=per_class, seed=seed, workers=workers) / "*.root")
    return read_jetclass(data_files, classes=classes, max_jets=max_jets)

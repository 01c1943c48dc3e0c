"""Where notebooks get their jets: any JetClass-schema files, or the embedded simulated default."""

from __future__ import annotations

import awkward as ak

from .data.jetclass import read_jetclass
from .simulation import default_dataset

__all__ = ["load_dataset", "dataset_files"]


def load_dataset(data_files=None, per_class: int = 300, seed: int = 1, classes=None,
                 max_jets: int | None = None, workers: int = 2) -> ak.Array:
    """Jets from ``data_files`` (path, glob or list of JetClass-schema files) or, when ``None``,
    from the embedded Pythia 8 simulation (``per_class`` jets per class, cached by settings; only
    ``classes`` are simulated when given)."""
    return read_jetclass(dataset_files(data_files, per_class, seed, workers, classes), classes=classes,
                         max_jets=max_jets)


def dataset_files(data_files=None, per_class: int = 300, seed: int = 1, workers: int = 2, classes=None):
    """``data_files`` as given, or the glob of the embedded simulation (simulated on first use;
    ``classes``: only these)."""
    if data_files is not None:
        return data_files
    return str(default_dataset(per_class=per_class, seed=seed, workers=workers, classes=classes) / "*.root")

"""Where notebooks get their jets: the embedded simulated default, or any JetClass-schema files."""

from __future__ import annotations

import os
from pathlib import Path

import awkward as ak
import numpy as np

from .jetclass import iter_jetclass, read_jetclass

__all__ = ["REPO", "data_root", "real_sample_path", "dataset_files", "load_dataset", "load_padded"]

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
    from the embedded Pythia 8 simulation (``per_class`` jets per class, cached by settings; only
    ``classes`` are simulated when given)."""
    return read_jetclass(dataset_files(data_files, per_class, seed, workers, classes), classes=classes,
                         max_jets=max_jets)


def dataset_files(data_files=None, per_class: int = 300, seed: int = 1, workers: int = 2, classes=None):
    """``data_files`` as given, or the glob of the embedded simulation (simulated on first use;
    ``classes``: only these)."""
    if data_files is not None:
        return data_files
    from .simulate import default_dataset

    return str(default_dataset(per_class=per_class, seed=seed, workers=workers, classes=classes) / "*.root")


def _feature_chunk(args) -> tuple:
    """Compact jagged features of some files: (flat (M, 3) float32, counts (N,), labels (N,))."""
    from .features import constituent_features

    files, classes, max_jets = args
    flats, counts, labels = [np.zeros((0, 3), np.float32)], [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    for jets in iter_jetclass(files, classes=classes, max_jets=max_jets):
        f = constituent_features(jets)
        flats.append(ak.to_numpy(ak.flatten(f, axis=1)).reshape(-1, 3))
        counts.append(ak.to_numpy(ak.num(f, axis=1)))
        labels.append(np.asarray(jets.label))
    return np.concatenate(flats), np.concatenate(counts), np.concatenate(labels)


def load_padded(files, classes=None, max_jets: int | None = None, max_len: int = 128,
                workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROOT files → ``(x (N, max_len, 3) float32, mask (N, max_len) bool, labels (N,))``.

    Reads and computes the scaled constituent features chunk by chunk; with ``workers > 1``
    the files are spread over processes, which return compact jagged features (padding to
    128 slots in the workers would triple what crosses the process boundary).
    """
    from .features import to_padded
    from .jetclass import _expand

    paths = _expand(files)
    if workers <= 1 or len(paths) == 1:
        parts = [_feature_chunk((paths, classes, max_jets))]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(paths))) as pool:
            parts = pool.map(_feature_chunk, [([p], classes, max_jets) for p in paths])
    flat, counts, labels = (np.concatenate(a) for a in zip(*parts))
    if max_jets is not None:
        flat, counts, labels = flat[: counts[:max_jets].sum()], counts[:max_jets], labels[:max_jets]
    x, mask = to_padded(ak.unflatten(flat, counts), max_len=max_len)
    return x, mask, labels

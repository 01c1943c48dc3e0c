"""JetClass-schema files straight into padded arrays (:func:`load_padded`), and the real 500-jet sample."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..io import REPO, OmnijetError
from .features import MAX_CONSTITUENTS, flat_features, pad_into
from .jetclass import _open_tree, _read_range
from .paths import input_files
from .schema import LABEL_BRANCHES, REQUIRED_BRANCHES as _REQUIRED, class_selection
from .validate import check_constituents, check_labels

__all__ = ["real_sample_path", "load_padded"]


def real_sample_path() -> Path | None:
    """The 500 real JetClass jets shipped beside the repository (``../shared``), if present."""
    p = REPO.parent / "shared" / "data" / "jetclass_real_500.root"
    return p if p.is_file() else None


LOAD_CHUNK = 20_000  # jets per task: temporaries stay in the tens of MB, threads stay busy


def load_padded(files, classes=None, max_jets: int | None = None, max_len: int = MAX_CONSTITUENTS,
                workers: int = 1, chunk: int = LOAD_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROOT files → ``(x (N, max_len, 3) float32, mask (N, max_len) bool, labels (N,) int32)``.

    The same arrays as ``to_padded(constituent_features(read_jetclass(...)))``, but it reads
    only what they need (``part_px/py/pz/energy`` and the labels, with read_jetclass's checks on them)
    and pads each chunk of about ``chunk`` jets (cut at the files' basket edges) straight into
    the output. ``workers`` threads share the chunks: uproot's decompression and numpy's kernels
    release the GIL, and nothing is copied between processes (2 threads: ~1.8x one).
    """
    if max_len <= 0:
        raise OmnijetError(f"max_len must be positive, got {max_len}")
    if max_jets is not None and max_jets < 0:
        raise OmnijetError(f"max_jets must be >= 0, got {max_jets}")
    wanted = class_selection(classes)
    # without a class selection max_jets is known up front: plan only the entries needed
    budget = max_jets if wanted is None else None
    trees = [(path, _open_tree(path)) for path in input_files(files)]
    total = sum(int(tree.num_entries) for _, tree in trees)
    if budget is not None:
        total = min(total, budget)
    if workers > 1:  # at least ~4 chunks per thread, so that small inputs are shared too
        chunk = min(chunk, max(1, -(-total // (4 * workers))))
    tasks, rows = [], 0  # (path, first entry, last entry + 1, first output row)
    for path, tree in trees:
        for start, stop in _entry_ranges(tree, chunk):
            if budget is not None:
                stop = min(stop, start + budget - rows)
            if stop > start:
                tasks.append((path, start, stop, rows))
                rows += stop - start
    x = np.zeros((rows, max_len, 3), np.float32)  # zero pages are only touched where written
    mask = np.zeros((rows, max_len), bool)
    labels = np.zeros(rows, np.int32)

    local = threading.local()  # each thread keeps its current file open (tasks go file by file)

    def fill(task) -> int:
        path, start, stop, row = task
        if getattr(local, "path", None) != path:
            local.path, local.tree = path, _open_tree(path)
        return _pad_range(path, local.tree, start, stop, wanted, x[row:], mask[row:], labels[row:])

    if workers <= 1 or len(tasks) <= 1:
        filled = [fill(t) for t in tasks]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(tasks))) as pool:
            try:
                filled = list(pool.map(fill, tasks))
            except BaseException:  # a bad file (or Ctrl-C) stops the other threads' queued chunks
                pool.shutdown(cancel_futures=True)
                raise
    if wanted is not None:  # keep the rows of the selected classes
        keep = np.concatenate([np.arange(t[3], t[3] + n) for t, n in zip(tasks, filled)] or [np.zeros(0, int)])
        keep = keep[:max_jets]
        x, mask, labels = x[keep], mask[keep], labels[keep]
    return x, mask, labels


def _entry_ranges(tree, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at least ``chunk`` entries (the last may be shorter), cut at
    basket edges so that no basket is decompressed twice (RNTuples: every ``chunk`` entries)."""
    if chunk <= 0:
        raise OmnijetError(f"chunk must be positive, got {chunk}")
    n = int(tree.num_entries)
    edges = getattr(tree[_REQUIRED[0]], "entry_offsets", None) or list(range(0, n, chunk)) + [n]
    ranges, start = [], 0
    for edge in edges[1:]:
        if edge - start >= chunk or edge == n:
            ranges.append((start, int(edge)))
            start = int(edge)
    return [r for r in ranges if r[1] > r[0]]


def _pad_range(path: Path, tree, start: int, stop: int, wanted, x: np.ndarray, mask: np.ndarray,
               labels: np.ndarray) -> int:
    """Features of entries ``[start, stop)`` (of the ``wanted`` classes) padded into the first
    rows of ``x``, ``mask``, ``labels``; returns the number of jets written."""
    xyz = _REQUIRED[:3]  # the energy does not enter the features, but it is checked like everywhere
    arrays = _read_range(path, tree, [*_REQUIRED, *(b for b in LABEL_BRANCHES if b in tree.keys())], start, stop)
    counts, flat = check_constituents(path, {b: arrays[b] for b in _REQUIRED}, start)
    jet_labels = check_labels(path, arrays, len(counts), start)
    if wanted is not None:
        sel = np.isin(jet_labels, wanted)
        per_constituent = np.repeat(sel, counts)
        flat = {b: v[per_constituent] for b, v in flat.items()}
        counts, jet_labels = counts[sel], jet_labels[sel]
    feats, kept = flat_features(*(flat[b] for b in xyz), counts)
    n = len(kept)
    pad_into(x[:n], mask[:n], feats, kept)
    labels[:n] = jet_labels
    return n

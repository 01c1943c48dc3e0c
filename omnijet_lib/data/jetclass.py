"""Read and write jets in the official JetClass ROOT schema.

One in-memory layout everywhere: an awkward record array with one entry per jet,

* ``part``   -- jagged Momentum4D constituents (``px, py, pz, E`` in GeV, vector behaviour),
* ``jet_pt, jet_eta, jet_phi, jet_energy, jet_nparticles, jet_sdmass, jet_tau1..4``,
* ``label``  -- integer class index in the official order (:data:`CLASS_NAMES`).

Simulated, downloaded and generated jets all pass through :func:`write_jetclass` /
:func:`read_jetclass`, so every notebook reads one format.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import awkward as ak
import numpy as np
import vector

from ..io import OmnijetError, atomic_path
from .schema import (CLASS_FILE_PREFIXES, CLASS_LABELS, CLASS_NAMES, JET_BRANCHES, LABEL_BRANCHES,
                     PART_BRANCHES, REQUIRED_BRANCHES as _REQUIRED, class_index, class_selection)
from .paths import input_files
from .validate import check_constituents, check_finite, check_jets, check_labels

vector.register_awkward()
log = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "CLASS_LABELS",
    "CLASS_FILE_PREFIXES",
    "PART_BRANCHES",
    "JET_BRANCHES",
    "LABEL_BRANCHES",
    "class_index",
    "make_jets",
    "read_jetclass",
    "iter_jetclass",
    "write_jetclass",
    "write_jetclass_chunks",
]

_TREE = "tree"
BASKET_JETS = 10_000  # jets per basket: readers can take a range without decompressing the file


# ----------------------------------------------------------------------------------- building
def make_jets(part: ak.Array, label: np.ndarray | int, extra: dict | None = None) -> ak.Array:
    """Build the in-memory jet array from jagged constituent 4-vectors and labels.

    ``part`` needs ``px, py, pz, E`` (GeV). Jet-level fields are computed from the constituents
    (axis = 4-vector sum, as in the official files); ``extra`` may supply any ``jet_*`` field
    (e.g. N-subjettiness) that should not be recomputed.
    """
    part = vector.zip({"px": part.px, "py": part.py, "pz": part.pz, "E": _energy(part)})
    n = len(part)
    label = np.broadcast_to(np.asarray(label, dtype=np.int32), (n,)).copy()
    jet = ak.sum(part, axis=1)  # Momentum4D sum
    fields = {
        "part": part,
        "jet_pt": ak.to_numpy(jet.pt).astype(np.float32),
        "jet_eta": np.nan_to_num(ak.to_numpy(jet.eta)).astype(np.float32),
        "jet_phi": ak.to_numpy(jet.phi).astype(np.float32),
        "jet_energy": ak.to_numpy(jet.E).astype(np.float32),
        "jet_nparticles": ak.to_numpy(ak.num(part, axis=1)).astype(np.float32),
    }
    for b in JET_BRANCHES:
        fields.setdefault(b, np.zeros(n, np.float32))
    for k, v in (extra or {}).items():
        fields[k] = np.asarray(v, dtype=np.float32)
    fields["label"] = label
    return ak.zip(fields, depth_limit=1)


def _energy(part: ak.Array) -> ak.Array:
    return part.E if "E" in part.fields else part.energy if "energy" in part.fields else part.t


# ------------------------------------------------------------------------------------ reading
def _open_tree(path: Path):
    import uproot

    try:
        f = uproot.open(path)
    except Exception as err:
        with open(path, "rb") as fh:  # a ROOT file starts with "root": then it is cut or damaged
            what = "truncated or corrupt ROOT file" if fh.read(4) == b"root" else "not a readable ROOT file"
        raise OmnijetError(f"{path}: {what} ({_oneline(err)})") from None
    try:
        if _TREE not in f:
            keys = ", ".join(k.split(";")[0] for k in f.keys()) or "none"
            raise OmnijetError(f"{path}: no TTree named '{_TREE}' (found: {keys})")
        tree = f[_TREE]
        branches = tree.keys()
    except OmnijetError:
        raise
    except Exception as err:
        raise OmnijetError(f"{path}: truncated or corrupt ROOT file ({_oneline(err)})") from None
    missing = [b for b in _REQUIRED if b not in branches]
    if missing:
        raise OmnijetError(f"{path}: missing branch {', '.join(missing)} in tree '{_TREE}'")
    return tree


def _oneline(err: Exception, limit: int = 200) -> str:
    text = " ".join(str(err).split())  # uproot's deserialisation errors dump whole objects
    return f"{type(err).__name__}: {text[:limit] + '...' if len(text) > limit else text}"


def _read_range(path: Path, tree, names, start: int | None = None, stop: int | None = None) -> dict:
    """Branches ``names`` of tree entries ``[start, stop)`` as awkward arrays; a failing read
    names the file. ``array_cache=None``: uproot would otherwise keep up to 100 MB of decoded
    arrays per open file."""
    try:
        arrays = tree.arrays(list(names), entry_start=start, entry_stop=stop, library="ak", array_cache=None)
    except Exception as err:
        raise OmnijetError(f"{path}: cannot read entries {start}..{stop}, truncated or corrupt "
                           f"({_oneline(err)})") from None
    return {k: arrays[k] for k in arrays.fields}


def _chunk_to_jets(path: Path, arrays: dict, start: int = 0) -> ak.Array:
    n = len(arrays["part_px"])
    check_constituents(path, {b: arrays[b] for b in _REQUIRED}, start)  # the jagged arrays are kept
    labels = check_labels(path, arrays, n, start)
    part = vector.zip({
        "px": arrays["part_px"], "py": arrays["part_py"], "pz": arrays["part_pz"],
        "E": arrays["part_energy"],
    })
    fields = {"part": part}
    for b in JET_BRANCHES:
        if b in arrays:
            v = np.asarray(arrays[b], dtype=np.float32)
            check_finite(path, b, v, start)
            fields[b] = v
        else:
            fields[b] = np.zeros(n, np.float32)
    fields["label"] = labels
    return ak.zip(fields, depth_limit=1)


def iter_jetclass(
    files,
    classes: Sequence[str | int] | None = None,
    max_jets: int | None = None,
    step_size: int = 100_000,
) -> Iterator[ak.Array]:
    """Stream jets chunk by chunk (at most ``step_size`` jets each) from JetClass-schema files."""
    paths = input_files(files)
    wanted = class_selection(classes)
    if max_jets is not None and max_jets < 0:
        raise OmnijetError(f"max_jets must be >= 0, got {max_jets}")
    if step_size <= 0:  # uproot would fail inside the read and the file would be blamed
        raise OmnijetError(f"step_size must be positive, got {step_size}")
    remaining = max_jets
    for path in paths:
        tree = _open_tree(path)
        names = [b for b in (*_REQUIRED, *JET_BRANCHES, *LABEL_BRANCHES) if b in tree.keys()]
        try:
            for arrays, report in tree.iterate(names, step_size=step_size, library="ak", report=True):
                jets = _chunk_to_jets(path, {k: arrays[k] for k in arrays.fields}, report.tree_entry_start)
                if wanted is not None:
                    jets = jets[np.isin(ak.to_numpy(jets.label), list(wanted))]
                if remaining is not None:
                    jets = jets[:remaining]
                    remaining -= len(jets)
                if len(jets):
                    yield jets
                if remaining == 0:
                    return
        except OmnijetError:
            raise
        except Exception as err:
            raise OmnijetError(f"{path}: cannot read tree '{_TREE}', truncated or corrupt ({_oneline(err)})") from None


def read_jetclass(files, classes=None, max_jets: int | None = None) -> ak.Array:
    """Read JetClass-schema ROOT files (a path, a glob or a list) into one jet array.

    ``classes`` keeps only those classes (names or indices); ``max_jets`` caps the total.
    Errors name the file and the problem (missing branch, wrong tree, NaN, not ROOT, ...).
    """
    chunks = list(iter_jetclass(files, classes=classes, max_jets=max_jets))
    if not chunks:
        return make_jets(vector.zip({"px": [[]], "py": [[]], "pz": [[]], "E": [[]]})[:0], 0)
    return chunks[0] if len(chunks) == 1 else ak.concatenate(chunks)


# ------------------------------------------------------------------------------------ writing
def write_jetclass(path: str | os.PathLike, jets: ak.Array) -> Path:
    """Write jets in the official schema (tree ``tree``), atomically (temp file + rename).

    Jets the readers would refuse (empty, non-finite, E < |p|, a label outside 0..9) are refused
    here, before anything is written."""
    path = write_jetclass_chunks(path, [jets])
    log.info("wrote %d jets to %s", len(jets), path)
    return path


def write_jetclass_chunks(path: str | os.PathLike, chunks: Iterable[ak.Array]) -> Path:
    """:func:`write_jetclass` for jets that arrive chunk by chunk (an iterable of jet arrays, e.g. a
    generator), so a file can hold more jets than memory: each chunk is checked and appended to one
    tree as it comes. The file appears only after the last chunk (an error or Ctrl-C on the way
    leaves none); the first chunk is checked before anything is created."""
    import uproot

    path = Path(path)
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None:
        raise OmnijetError(f"{path}: no jets to write (no chunk given)")
    where = f"{path}: refusing to write"
    check_jets(where, first)  # nothing the readers would refuse
    with atomic_path(path) as tmp:
        with uproot.recreate(tmp) as f:
            for i, jets in enumerate(itertools.chain([first], chunks)):
                if i:
                    check_jets(where, jets)
                branches = _branches(jets)
                if i == 0:
                    # mktree + extend writes a TTree like the official files (plain assignment would
                    # give an RNTuple in recent uproot); read_jetclass accepts both.
                    tree = f.mktree(_TREE, {k: (v.type.content if k == "part" else v.dtype)
                                            for k, v in branches.items()})
                for start in range(0, max(len(jets), 1), BASKET_JETS):  # one basket per branch and block
                    tree.extend({k: v[start:start + BASKET_JETS] for k, v in branches.items()})
    return path


def _branches(jets: ak.Array) -> dict:
    """The tree's branches of ``jets``: ``part`` (a record of the jagged constituent columns, which
    uproot writes as part_px, ... sharing one counter npart), the jet_* and the one-hot label_* ones."""
    part = jets.part
    n = len(jets)
    jet_axis = vector.zip({"pt": jets.jet_pt, "eta": jets.jet_eta, "phi": jets.jet_phi, "mass": 0})
    # JetClass convention: part_deta is mirrored by the sign of the jet's eta.
    deta = part.deltaeta(jet_axis) * np.sign(jets.jet_eta) if n else part.px
    dphi = part.deltaphi(jet_axis) if n else part.px
    cols = {"px": part.px, "py": part.py, "pz": part.pz, "energy": part.E, "deta": deta, "dphi": dphi}
    branches = {"part": ak.zip({k: ak.values_astype(ak.Array(v), np.float32) for k, v in cols.items()})}
    for b in JET_BRANCHES:
        branches[b] = ak.to_numpy(jets[b]).astype(np.float32)
    labels = ak.to_numpy(jets.label)
    for i, b in enumerate(LABEL_BRANCHES):
        branches[b] = (labels == i).astype(np.float32)
    return branches

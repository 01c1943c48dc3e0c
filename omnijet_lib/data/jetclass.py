"""Read and write jets in the official JetClass ROOT schema.

One in-memory layout everywhere: an awkward record array with one entry per jet,

* ``part``   -- jagged Momentum4D constituents (``px, py, pz, E`` in GeV, vector behaviour),
* ``jet_pt, jet_eta, jet_phi, jet_energy, jet_nparticles, jet_sdmass, jet_tau1..4``,
* ``label``  -- integer class index in the official order (:data:`CLASS_NAMES`).

Simulated, downloaded and generated jets all pass through :func:`write_jetclass` /
:func:`read_jetclass`, so every notebook reads one format.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import awkward as ak
import numpy as np
import vector

from ..io import OmnijetError, atomic_path

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
]

#: Human-readable class names, in the official JetClass order.
CLASS_NAMES = (
    "QCD", "H→bb̄", "H→cc̄", "H→gg", "H→4q", "H→ℓνqq'", "Z→qq̄", "W→qq'", "t→bqq'", "t→bℓν",
)
#: Short names used by the ``label_*`` branches (same order).
CLASS_LABELS = ("QCD", "Hbb", "Hcc", "Hgg", "H4q", "Hqql", "Zqq", "Wqq", "Tbqq", "Tbl")
#: Official file-name prefixes (same order): ``<prefix>_<NNN>.root``.
CLASS_FILE_PREFIXES = (
    "ZJetsToNuNu", "HToBB", "HToCC", "HToGG", "HToWW4Q", "HToWW2Q1L", "ZToQQ", "WToQQ",
    "TTBar", "TTBarLep",
)

PART_BRANCHES = ("part_px", "part_py", "part_pz", "part_energy", "part_deta", "part_dphi")
JET_BRANCHES = (
    "jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_nparticles", "jet_sdmass",
    "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4",
)
LABEL_BRANCHES = tuple(f"label_{c}" for c in CLASS_LABELS)
_REQUIRED = ("part_px", "part_py", "part_pz", "part_energy")
_TREE = "tree"
BASKET_JETS = 10_000  # jets per basket: readers can take a range without decompressing the file


def class_index(name: str | int) -> int:
    """Index of a class given by index, short label (``Tbqq``), display name or file prefix."""
    if isinstance(name, (int, np.integer)):
        if 0 <= int(name) < len(CLASS_NAMES):
            return int(name)
        raise OmnijetError(f"class index {name} out of range 0..{len(CLASS_NAMES) - 1}")
    for table in (CLASS_LABELS, CLASS_NAMES, CLASS_FILE_PREFIXES):
        if name in table:
            return table.index(name)
    lowered = {t.lower(): i for t in CLASS_LABELS for i in [CLASS_LABELS.index(t)]}
    if str(name).lower() in lowered:
        return lowered[str(name).lower()]
    raise OmnijetError(f"unknown jet class {name!r}; known: {', '.join(CLASS_LABELS)}")


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
def _expand(files: str | os.PathLike | Iterable) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[Path] = []
    for f in files:
        s = str(f)
        if any(ch in s for ch in "*?["):
            matches = sorted(_glob.glob(s))
            if not matches:
                raise OmnijetError(f"{s}: no files match this pattern")
            out += [Path(m) for m in matches]
        else:
            out.append(Path(s))
    if not out:
        raise OmnijetError("no input files given")
    for p in out:
        if not p.exists():
            raise OmnijetError(f"{p}: file not found")
        if p.is_dir():
            raise OmnijetError(f"{p}: is a directory; pass a file or a glob like '{p}/*.root'")
    return out


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


def _labels_from_tree(path: Path, arrays: dict, n: int) -> np.ndarray:
    present = [b for b in LABEL_BRANCHES if b in arrays]
    if not present:
        raise OmnijetError(f"{path}: no label_* branches (expected {', '.join(LABEL_BRANCHES)})")
    onehot = np.zeros((n, len(LABEL_BRANCHES)), dtype=np.float32)
    for b in present:
        onehot[:, LABEL_BRANCHES.index(b)] = np.asarray(arrays[b], dtype=np.float32)
    bad = onehot.sum(axis=1) != 1
    if bad.any():
        raise OmnijetError(f"{path}: {bad.sum()} jets do not have exactly one label_* set")
    return onehot.argmax(axis=1).astype(np.int32)


def _check_finite(path: Path, name: str, values: np.ndarray, start: int = 0, counts=None) -> None:
    """NaN/inf is an error naming the branch and the first bad jet (its entry in the tree)."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = ~np.isfinite(values)
        first = int(np.argmax(bad))
        if counts is not None:  # flat constituent index -> jet index
            first = int(np.searchsorted(np.cumsum(counts), first, side="right"))
        raise OmnijetError(f"{path}: branch {name} contains {int(bad.sum())} NaN/inf values "
                           f"(first in entry {start + first})")


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


def _flat_constituents(path: Path, arrays: dict, names=_REQUIRED, start: int = 0) -> tuple[np.ndarray, dict]:
    """``(counts (N,), {branch: flat float32 values})`` of the jagged branches ``names``, checked:
    no jet without constituents, no NaN/inf (errors name the file and the first bad entry)."""
    counts = ak.to_numpy(ak.num(arrays[names[0]], axis=1))
    flat = {}
    for b in names:
        flat[b] = ak.to_numpy(ak.flatten(arrays[b])).astype(np.float32, copy=False)
        _check_finite(path, b, flat[b], start, counts)
    if (counts == 0).any():  # JetClass jets always have constituents; an empty one is a broken file
        raise OmnijetError(f"{path}: {int((counts == 0).sum())} jets have no constituents "
                           f"(first: entry {start + int(np.argmax(counts == 0))})")
    return counts, flat


def _chunk_to_jets(path: Path, arrays: dict, start: int = 0) -> ak.Array:
    n = len(arrays["part_px"])
    _flat_constituents(path, arrays, _REQUIRED, start)  # the checks; the jagged arrays are kept
    labels = _labels_from_tree(path, arrays, n)
    part = vector.zip({
        "px": arrays["part_px"], "py": arrays["part_py"], "pz": arrays["part_pz"],
        "E": arrays["part_energy"],
    })
    fields = {"part": part}
    for b in JET_BRANCHES:
        if b in arrays:
            v = np.asarray(arrays[b], dtype=np.float32)
            _check_finite(path, b, v, start)
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
    paths = _expand(files)
    wanted = None if classes is None else {class_index(c) for c in classes}
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
    """Write jets in the official schema (tree ``tree``), atomically (temp file + rename)."""
    import uproot

    path = Path(path)
    part = jets.part
    n = len(jets)
    counts = ak.num(part, axis=1)
    if n and ak.any(counts == 0):
        raise OmnijetError(f"{path}: refusing to write {int(ak.sum(counts == 0))} jets with no constituents")
    jet_axis = vector.zip({"pt": jets.jet_pt, "eta": jets.jet_eta, "phi": jets.jet_phi, "mass": 0})
    # JetClass convention: part_deta is mirrored by the sign of the jet's eta.
    deta = part.deltaeta(jet_axis) * np.sign(jets.jet_eta) if n else part.px
    dphi = part.deltaphi(jet_axis) if n else part.px
    cols = {"px": part.px, "py": part.py, "pz": part.pz, "energy": part.E, "deta": deta, "dphi": dphi}
    # a record named "part" becomes the TTree branches part_px, ... sharing one counter npart
    branches = {"part": ak.zip({k: ak.values_astype(ak.Array(v), np.float32) for k, v in cols.items()})}
    for b in JET_BRANCHES:
        branches[b] = ak.to_numpy(jets[b]).astype(np.float32)
    labels = ak.to_numpy(jets.label)
    for i, b in enumerate(LABEL_BRANCHES):
        branches[b] = (labels == i).astype(np.float32)
    with atomic_path(path) as tmp:
        with uproot.recreate(tmp) as f:
            # mktree + extend writes a TTree like the official files (plain assignment would
            # give an RNTuple in recent uproot); read_jetclass accepts both.
            tree = f.mktree(_TREE, {k: (v.type.content if k == "part" else v.dtype) for k, v in branches.items()})
            for start in range(0, max(n, 1), BASKET_JETS):  # one basket per branch and block
                tree.extend({k: v[start:start + BASKET_JETS] for k, v in branches.items()})
    log.info("wrote %d jets to %s", n, path)
    return path

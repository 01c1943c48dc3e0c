"""What a jet file must hold, checked in one place for every reader and for the writer.

A constituent block (the ``part_*`` branches, or an in-memory ``part`` record) is valid when

* every branch has the same number of constituents in every jet, and no jet is empty;
* every value is finite;
* each constituent's energy covers its momentum, ``E >= |p|`` up to float32 rounding
  (:data:`ENERGY_RTOL`; in the real JetClass sample ``(E - |p|)/|p|`` is never below -1e-7).

Labels are valid when every ``label_*`` value is exactly 0 or 1 and exactly one is 1 per jet
(in memory: an integer class index in ``0..9``).

Every refusal is one :class:`OmnijetError` line naming the file, the branch and the first bad
entry (its number in the tree: ``start`` is the first entry of the chunk being checked). Only the
branches a reader loads are checked: a ``part_*`` branch that is never read cannot change its result.
"""

from __future__ import annotations

import awkward as ak
import numpy as np

from ..io import OmnijetError
from .schema import CLASS_NAMES, JET_BRANCHES, LABEL_BRANCHES

__all__ = ["ENERGY_RTOL", "check_constituents", "check_finite", "check_labels", "check_jets"]

#: relative tolerance of ``E >= |p|`` (float32 rounding of E and of the momentum components)
ENERGY_RTOL = 1e-5
_ENERGY_ATOL = 1e-6  # GeV: constituents of (almost) zero momentum


def _entry(first_flat: int, counts: np.ndarray) -> int:
    """Jet index of the constituent at flat position ``first_flat``."""
    return int(np.searchsorted(np.cumsum(counts), first_flat, side="right"))


def check_finite(where, name: str, values: np.ndarray, start: int = 0, counts=None) -> None:
    """NaN/inf is an error naming the branch and the first bad jet (its entry in the tree)."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = ~np.isfinite(values)
        first = int(np.argmax(bad))
        if counts is not None:  # flat constituent index -> jet index
            first = _entry(first, counts)
        raise OmnijetError(f"{where}: branch {name} contains {int(bad.sum())} NaN/inf values "
                           f"(first in entry {start + first})")


def check_constituents(where, jagged: dict, start: int = 0) -> tuple[np.ndarray, dict]:
    """``(counts (N,), {branch: flat float32 values})`` of the jagged branches in ``jagged``
    (first one sets the per-jet lengths), after every check of the module docstring. The energy
    check runs when ``part_energy`` and ``part_px/py/pz`` are all present."""
    names = list(jagged)
    counts = ak.to_numpy(ak.num(jagged[names[0]], axis=1))
    for b in names[1:]:
        other = ak.to_numpy(ak.num(jagged[b], axis=1))
        if len(other) != len(counts) or (other != counts).any():
            i = int(np.argmax(other != counts)) if len(other) == len(counts) else min(len(other), len(counts))
            have = other[i] if i < len(other) else "no entry"
            want = counts[i] if i < len(counts) else "no entry"
            raise OmnijetError(f"{where}: branch {b} has {have} constituents in entry {start + i} but "
                               f"{names[0]} has {want}; the part_* branches must agree jet by jet")
    flat = {}
    for b in names:
        flat[b] = ak.to_numpy(ak.flatten(jagged[b])).astype(np.float32, copy=False)
        check_finite(where, b, flat[b], start, counts)
    if (counts == 0).any():  # JetClass jets always have constituents; an empty one is a broken file
        raise OmnijetError(f"{where}: {int((counts == 0).sum())} jets have no constituents "
                           f"(first: entry {start + int(np.argmax(counts == 0))})")
    if all(b in flat for b in ("part_px", "part_py", "part_pz", "part_energy")):
        px, py, pz, e = (flat[b] for b in ("part_px", "part_py", "part_pz", "part_energy"))
        # E >= |p| (1 - rtol) - atol, in float32 (exact enough for rtol 1e-5; no float64 copies). hypot
        # does not square: components near the float32 maximum (3e38) do not overflow; an |p| beyond
        # it is inf, which no finite E reaches, so the constituent is reported below
        with np.errstate(over="ignore"):
            p = np.hypot(np.hypot(px, py), pz)
        bound = np.maximum(p * np.float32(1 - ENERGY_RTOL) - _ENERGY_ATOL, 0)
        bad = e < bound
        if bad.any():
            i = int(np.argmax(bad))
            p_i = float(np.sqrt(float(px[i]) ** 2 + float(py[i]) ** 2 + float(pz[i]) ** 2))
            raise OmnijetError(f"{where}: branch part_energy is below the momentum |p| in {int(bad.sum())} "
                               f"constituents (first in entry {start + _entry(i, counts)}: "
                               f"E = {e[i]:.4g} GeV, |p| = {p_i:.4g} GeV)")
    return counts, flat


def check_labels(where, labels: dict, n: int, start: int = 0) -> np.ndarray:
    """Class index (N,) int32 from the ``label_<name>`` branches in ``labels`` (missing ones count
    as 0): every value exactly 0 or 1, exactly one 1 per jet."""
    present = [b for b in LABEL_BRANCHES if b in labels]
    if not present:
        raise OmnijetError(f"{where}: no label_* branches (expected {', '.join(LABEL_BRANCHES)})")
    onehot = np.zeros((n, len(LABEL_BRANCHES)), dtype=np.float32)
    for b in present:
        v = np.asarray(labels[b], dtype=np.float32)
        off = (v != 0) & (v != 1)
        if off.any():
            i = int(np.argmax(off))
            raise OmnijetError(f"{where}: branch {b} is {v[i]:g} in entry {start + i}; label_* values must be "
                               f"exactly 0 or 1 (one-hot)")
        onehot[:, LABEL_BRANCHES.index(b)] = v
    bad = onehot.sum(axis=1) != 1
    if bad.any():
        i = int(np.argmax(bad))
        set_ = [b for b, v in zip(LABEL_BRANCHES, onehot[i]) if v] or ["none"]
        raise OmnijetError(f"{where}: {int(bad.sum())} jets do not have exactly one label_* set "
                           f"(first: entry {start + i} has {', '.join(set_)})")
    return onehot.argmax(axis=1).astype(np.int32)


def check_jets(where, jets: ak.Array) -> None:
    """The in-memory jet array (:func:`~omnijet_lib.data.jetclass.make_jets` layout) satisfies
    what the readers will require of the file it is written to."""
    if len(jets) == 0:
        return
    part = jets.part
    check_constituents(where, {"part_px": part.px, "part_py": part.py, "part_pz": part.pz,
                               "part_energy": part.E})
    for b in JET_BRANCHES:
        check_finite(where, b, ak.to_numpy(jets[b]))
    label = ak.to_numpy(jets.label)
    if label.dtype.kind not in "iu":
        raise OmnijetError(f"{where}: label has dtype {label.dtype}, expected integer class indices")
    off = (label < 0) | (label >= len(CLASS_NAMES))
    if off.any():
        i = int(np.argmax(off))
        raise OmnijetError(f"{where}: label {int(label[i])} of jet {i} is not a class index 0..{len(CLASS_NAMES) - 1}")


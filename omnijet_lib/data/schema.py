"""The JetClass schema: class names and order, file-name prefixes, branch names."""

from __future__ import annotations

import numpy as np

from ..io import OmnijetError

__all__ = ["CLASS_NAMES", "CLASS_LABELS", "CLASS_FILE_PREFIXES", "PART_BRANCHES", "JET_BRANCHES",
           "LABEL_BRANCHES", "REQUIRED_BRANCHES", "class_index", "class_selection"]

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
#: the constituent branches every reader needs
REQUIRED_BRANCHES = ("part_px", "part_py", "part_pz", "part_energy")


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


def class_selection(classes, name: str = "classes") -> list[int] | None:
    """Sorted class indices of a selection (names or indices); ``None`` keeps every class. An empty
    selection would select nothing and is an error naming the argument ``name``."""
    if classes is None:
        return None
    if isinstance(classes, (str, int, np.integer)):
        classes = [classes]
    try:
        wanted = sorted({class_index(c) for c in classes})
    except OmnijetError as err:
        raise OmnijetError(f"{name}: {err}") from None
    if not wanted:
        raise OmnijetError(f"{name} names no class, so nothing would be selected; give e.g. QCD Tbqq, "
                           f"or leave it out for all {len(CLASS_LABELS)}")
    return wanted

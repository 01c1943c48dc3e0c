"""Data I/O: the JetClass schema, constituent features, reading, download and token shards."""

from .loading import load_padded, real_sample_path
from .download import download_archive, download_jetclass, extract_archive
from .features import (
    FEATURE_NAMES,
    MAX_CONSTITUENTS,
    constituent_features,
    features_to_p4,
    padded_to_jagged,
    to_padded,
)
from .jetclass import (
    CLASS_FILE_PREFIXES,
    CLASS_LABELS,
    CLASS_NAMES,
    class_index,
    iter_jetclass,
    make_jets,
    read_jetclass,
    write_jetclass,
)

__all__ = [
    "CLASS_FILE_PREFIXES", "CLASS_LABELS", "CLASS_NAMES", "FEATURE_NAMES", "MAX_CONSTITUENTS",
    "class_index", "download_archive", "download_jetclass", "extract_archive", "load_padded", "real_sample_path", "constituent_features", "features_to_p4", "iter_jetclass", "make_jets",
    "padded_to_jagged", "read_jetclass", "to_padded", "write_jetclass",
]

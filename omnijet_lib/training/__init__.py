"""Training loops: Lightning modules per model family and one shared :func:`fit`."""

from .batching import BucketBatchSampler, PaddedDataset, collate_trimmed, make_loader
from .fit import TrainConfig, fit

__all__ = [
    "BucketBatchSampler", "PaddedDataset", "TrainConfig", "collate_trimmed", "default_device",
    "fit", "load_model", "make_loader", "save_model",
]

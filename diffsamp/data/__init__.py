"""Data: image data sets as uint8 tensors (``datasets``), one restorable batch sampler (``batches``) and the
2-D toy couplings of rectified flow (``toys``)."""

from diffsamp.data.batches import BatchSampler
from diffsamp.data.datasets import (
    DATASETS,
    ENV_VAR,
    SPLITS,
    DataNotFoundError,
    ImageTensorDataset,
    data_root,
    find_idx_file,
    load_dataset,
    load_dataset_uint8,
    load_labels,
    make_loader,
    pad_images,
    read_idx,
)
from diffsamp.images import to_float, to_uint8

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "SPLITS",
    "BatchSampler",
    "DataNotFoundError",
    "ImageTensorDataset",
    "data_root",
    "find_idx_file",
    "load_dataset",
    "load_dataset_uint8",
    "load_labels",
    "make_loader",
    "pad_images",
    "read_idx",
    "to_float",
    "to_uint8",
]

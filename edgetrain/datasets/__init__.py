"""Data sets for edgetrain: loading (download, checksum, cache), text encoding and sharding.

Pure data code, no networking besides downloads. Public API::

    load_dataset(name, ...) -> Dataset      # DATASET_NAMES lists the names
    shard_indices(labels, rank, world, seed, scheme="iid", alpha=0.5) -> LongTensor
    default_cache_dir() -> Path
"""

from edgetrain.datasets.base import (
    Dataset,
    DatasetFormatError,
    DownloadError,
    ShardingError,
    Split,
)
from edgetrain.datasets.download import default_cache_dir
from edgetrain.datasets.registry import DATASET_NAMES, load_dataset
from edgetrain.datasets.sharding import SCHEMES, shard_indices
from edgetrain.datasets.text import Vocab, tokenize

__all__ = [
    "DATASET_NAMES",
    "SCHEMES",
    "Dataset",
    "DatasetFormatError",
    "DownloadError",
    "ShardingError",
    "Split",
    "Vocab",
    "default_cache_dir",
    "load_dataset",
    "shard_indices",
    "tokenize",
]

"""Hand datasets: Parquet shard store, torch Dataset, real-data converters (``convert``)."""

from cmkg.data.dataset import HandDataset, identity_collate, prepare_batch
from cmkg.data.store import (
    DatasetWriter,
    config_key,
    read_manifest,
    read_split,
    synth_source,
    synthesize,
)

__all__ = ["DatasetWriter", "HandDataset", "config_key", "identity_collate", "prepare_batch",
           "read_manifest", "read_split", "synth_source", "synthesize"]

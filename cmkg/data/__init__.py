"""Hand datasets: the Parquet shard store, the torch Dataset, and (later) real-data converters."""

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

"""Identity shards: the schema, writers, the synthetic demo world and the Lightning DataModule."""

from divrl.data.datamodule import IdentityDataModule, resolve_shards
from divrl.data.schema import IdentityRecord, check_identity_id
from divrl.data.synthetic import synthetic_records, write_demo_dataset, write_shards

__all__ = [
    "IdentityDataModule",
    "IdentityRecord",
    "check_identity_id",
    "resolve_shards",
    "synthetic_records",
    "write_demo_dataset",
    "write_shards",
]

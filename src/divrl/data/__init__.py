"""Identity shards (schema, writers) and data sources. The Lightning DataModule arrives with the trainer."""

from divrl.data.schema import IdentityRecord, check_identity_id
from divrl.data.synthetic import synthetic_records, write_shards

__all__ = ["IdentityRecord", "check_identity_id", "synthetic_records", "write_shards"]

"""Identity shards: the schema, writers, the synthetic demo world and the Lightning DataModule."""

from typing import TYPE_CHECKING

from divrl.data.schema import IdentityRecord, check_identity_id
from divrl.data.synthetic import synthetic_records, write_demo_dataset, write_shards

if TYPE_CHECKING:  # for type checkers and the API reference; loaded lazily below
    from divrl.data.datamodule import IdentityDataModule, resolve_shards

__all__ = [
    "IdentityDataModule",
    "IdentityRecord",
    "check_identity_id",
    "resolve_shards",
    "synthetic_records",
    "write_demo_dataset",
    "write_shards",
]


def __getattr__(name: str):
    # The DataModule imports Lightning (about 3 s): loaded on first use, so a reward server or a data tool that reads
    # shards (divrl.data.stream, .schema) starts without it.
    if name in ("IdentityDataModule", "resolve_shards"):
        from divrl.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'divrl.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

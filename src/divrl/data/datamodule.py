"""``IdentityDataModule``: identity shards (DESIGN.md schema) streamed as batches of training conditions.

The math of the stream lives in :mod:`divrl.data.stream`; this is the thin Lightning layer: it resolves the shard
paths (failing fast with a clear message), captures the rank when the dataloaders are built, counts the batches
training consumed (its checkpointed *data position*) and restarts the stream there on resume.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from divrl.data.stream import (
    ConditionBatch,
    TrainConditionStream,
    ValConditionStream,
    split_for_rank,
)

__all__ = ["IdentityDataModule", "check_shards", "resolve_shards"]


def resolve_shards(shards: str | os.PathLike | Sequence[str], what: str = "shards") -> list[str]:
    """Expand ``shards`` into a sorted list of tar files.

    Accepts a folder (every ``*.tar`` in it), a glob (``data/train-*.tar``), WebDataset brace notation
    (``data/shard-{000000..000009}.tar``), a single file, or a list of any of these.

    Raises:
        FileNotFoundError: a folder or file that does not exist, or a folder or pattern with no ``.tar`` file; the
            message names the path and how to make shards.
    """
    from webdataset.shardlists import expand_urls

    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not items:
        raise FileNotFoundError(f"{what}: empty list of shards")
    urls: list[str] = []
    hint = (
        f"write shards with `divrl data synthetic --out DIR` (or another `divrl data` source) and point to them "
        f"(relative paths start at {os.getcwd()!r})"
    )
    for item in items:
        item = os.fspath(item)
        if "://" in item or item.startswith("pipe:"):
            urls.extend(expand_urls(item))  # remote or piped shards: checked when read
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{what}: folder {item!r} holds no .tar shards; {hint}")
            urls.extend(found)
            continue
        expanded = [u for pattern in expand_urls(item) for u in (sorted(glob.glob(pattern)) or [pattern])]
        missing = [u for u in expanded if not Path(u).is_file()]
        if missing:
            kind = "folder" if not Path(item).suffix else "shard"
            raise FileNotFoundError(f"{what}: {kind} {missing[0]!r} does not exist; {hint}")
        urls.extend(expanded)
    return urls


def check_shards(urls: Sequence[str], what: str = "shards") -> None:
    """Refuse local shards no sample can come from, reading each one's first tar header (cheap): a tar with no
    member (a resampled training stream would draw it forever) or a file that is not a tar archive. Remote and
    ``pipe:`` urls are checked when read.

    Raises:
        ValueError: naming the shard, what is wrong with it and the fix.
    """
    import tarfile

    fix = "write shards with `divrl data ... --out DIR` and point to them, or leave this file out"
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            continue
        try:
            with tarfile.open(url, "r|*") as tar:
                first = tar.next()
        except tarfile.ReadError as err:
            if str(err) != "empty file":
                raise ValueError(f"{what}: {url} is not a tar archive ({err}); {fix}") from None
            first = None
        if first is None:
            raise ValueError(f"{what}: {url} holds no sample (an empty tar archive); {fix}")


def _collate(batch: ConditionBatch) -> ConditionBatch:
    return batch  # batches are formed in the stream (``batch_size=None``); PIL images stay PIL images


class IdentityDataModule(pl.LightningDataModule):
    """Streams training conditions (identity + one drawn prompt) from WebDataset identity shards.

    Each condition carries all the identity's references and masks (see :class:`~divrl.data.stream.ConditionSample`).

    Every rank runs exactly ``steps_per_epoch`` batches per epoch from an endless resampled stream of its own share
    of the shards (disjoint across ranks when there are at least as many shards as ranks); the stream is
    deterministic for ``seed`` and resumes at the checkpointed data position.

    Args:
        shards: training shards: a folder, a glob, brace notation, or a list (see :func:`resolve_shards`).
        val_shards: validation shards; ``None`` validates on the first identities of ``shards``.
        batch_size: conditions per training batch and rank; each becomes a group of ``group_size`` rollouts
            (DivRL: 32 groups per epoch over all ranks). A batch holds identities of one reference count (see
            :mod:`divrl.data.stream`).
        steps_per_epoch: training batches per epoch and rank.
        val_identities: identities per rank in the validation set (each with its first prompt), at least 1 (turn
            validation off with ``trainer.limit_val_batches: 0``).
        num_workers: DataLoader worker processes (0 reads in the main process; decoding a few PNGs per step is
            rarely the bottleneck of RL training).
        shuffle_buffer: identities held in the shuffle buffer of each stream.
        seed: seeds shard sampling, shuffling and prompt choice.
        max_consecutive_bad: stop with an error after this many unreadable samples in a row.
    """

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 1,
        steps_per_epoch: int = 100,
        val_identities: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 64,
        seed: int = 0,
        max_consecutive_bad: int = 1000,
    ):
        super().__init__()
        settings = (
            ("batch_size", batch_size, 1),
            ("steps_per_epoch", steps_per_epoch, 1),
            ("val_identities", val_identities, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 1),
            ("max_consecutive_bad", max_consecutive_bad, 1),
        )
        for name, value, least in settings:
            if value < least:
                off = " (to validate nothing, set trainer.limit_val_batches: 0)" if name == "val_identities" else ""
                raise ValueError(
                    f"data.{name} must be >= {least}, got {value}: set it in the config's data: section "
                    f"or with --data.{name}{off}"
                )
        self.shards = shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.val_identities = val_identities
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.max_consecutive_bad = max_consecutive_bad
        self.position = 0  # training batches consumed so far on this rank (checkpointed)
        self._train_stream: TrainConditionStream | None = None
        self._urls: list[str] | None = None

    # ------------------------------------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard paths, failing fast (with the path and the fix) when they do not exist, are empty or are
        not tar archives (:func:`check_shards`)."""
        self._urls = resolve_shards(self.shards, "data.shards")
        check_shards(self._urls, "data.shards")
        if self.val_shards is not None:
            check_shards(resolve_shards(self.val_shards, "data.val_shards"), "data.val_shards")

    def train_dataloader(self) -> DataLoader:
        """The rank's training stream, starting at the data position (batches of :class:`ConditionBatch`)."""
        rank, world = self._rank_world()  # captured here, in the main process
        urls = split_for_rank(self._urls or resolve_shards(self.shards, "data.shards"), rank, world)
        self._train_stream = TrainConditionStream(
            urls,
            batch_size=self.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            seed=self.seed,
            rank=rank,
            shuffle_buffer=self.shuffle_buffer,
            max_consecutive_bad=self.max_consecutive_bad,
        )
        return _PositionedLoader(self, self._train_stream, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """The rank's fixed validation set (the same number of batches on every rank)."""
        rank, world = self._rank_world()
        what = "data.val_shards" if self.val_shards is not None else "data.shards"
        urls = resolve_shards(self.val_shards if self.val_shards is not None else self.shards, what)
        stream = ValConditionStream(
            urls,
            batch_size=self.batch_size,
            num_identities=self.val_identities,
            rank=rank,
            world=world,
            max_consecutive_bad=self.max_consecutive_bad,
            what=what,
        )
        return DataLoader(stream, batch_size=None, collate_fn=_collate, num_workers=min(self.num_workers, 1))

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count the batch as consumed when it goes to ``training_step``; the batch passes unchanged."""
        if self.trainer is not None and self.trainer.training:
            self.position += 1  # one more batch handed to training_step
        return batch

    def state_dict(self) -> dict:
        """The data position and the settings that determine the stream (checkpointed)."""
        return {
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the data position; warns when a setting that changes the data order differs from the checkpoint."""
        changed = [
            k
            for k in ("seed", "batch_size", "steps_per_epoch", "num_workers")
            if state.get(k, getattr(self, k)) != getattr(self, k)
        ]
        if changed:
            import warnings

            warnings.warn(
                f"IdentityDataModule: {', '.join(f'{k} {state[k]} -> {getattr(self, k)}' for k in changed)} changed since "
                f"the checkpoint; training goes on from batch {state['position']} but the data order differs from an "
                f"uninterrupted run",
                stacklevel=2,
            )
        self.position = int(state["position"])

    # ------------------------------------------------------------------------------------------------ helpers

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size


class _PositionedLoader(DataLoader):
    """A DataLoader that starts each iteration at the DataModule's data position (set before workers are forked)."""

    def __init__(self, datamodule: IdentityDataModule, stream: TrainConditionStream, num_workers: int):
        super().__init__(stream, batch_size=None, collate_fn=_collate, num_workers=num_workers)
        self._datamodule = datamodule

    def __iter__(self):
        self.dataset.position = self._datamodule.position
        return super().__iter__()

    # Lightning checkpoints the state of resumable loaders; the data position lives in the DataModule.
    def state_dict(self) -> dict:
        """The DataModule's data position."""
        return {"position": self._datamodule.position}

    def load_state_dict(self, state: dict) -> None:
        """Restore the DataModule's data position."""
        self._datamodule.position = int(state["position"])

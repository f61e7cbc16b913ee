"""Deterministic, resumable condition streams over identity shards (plain torch + webdataset, no Lightning).

A training *condition* is one identity (its references and masks) with one prompt drawn from its list. A rank's
stream is fully determined by ``(seed, rank, epoch, position)``, so a run resumed at global batch position ``P`` sees
exactly the batches an uninterrupted run would have seen there.

Layout of an epoch of ``E`` batches on one rank served by ``W`` DataLoader workers (``W = 1`` in the main process):
batch ``j`` of the epoch comes from *logical stream* ``j mod W``; each logical stream is an endless resampled
shard stream seeded by ``(seed, rank, epoch, stream)`` (shards drawn with replacement, samples shuffled through a
small buffer, a prompt drawn per identity). A DataLoader always starts its round robin with worker 0, so an iteration
that starts at epoch position ``s`` (a resume) lets worker ``w`` play logical stream ``(s + w) mod W`` after skipping
the batches that stream already served before ``s``.

Every batch holds identities of one reference count (a policy conditions a batch on the same number of references
per condition): the conditions are bucketed by their number of references and a bucket becomes a batch as soon as it
holds ``batch_size`` of them. With one reference count in the data the batches are exactly ``batch_size`` conditions
at a time, in stream order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from divrl.data.schema import FirstReference, IdentityRecord, normalise_references
from divrl.images import MIN_SIDE

__all__ = [
    "ConditionBatch",
    "ConditionSample",
    "SkipCounter",
    "TrainConditionStream",
    "ValConditionStream",
    "read_identities",
    "to_condition",
]

log = logging.getLogger(__name__)


@dataclass
class ConditionSample(FirstReference):
    """One (identity, prompt) condition: what a group of ``G`` rollouts is conditioned on.

    ``ConditionSample(id, prompt, image, mask, category)`` (one image and its mask, not in a list) means one
    reference. After construction ``masks`` is a list as long as ``references``, ``None`` where a reference has no
    mask (see :func:`~divrl.data.schema.normalise_references`).

    Attributes:
        id: the identity id.
        prompt: the prompt of this condition (one of the identity's prompts).
        references: the identity's reference images, at least one (RGB PIL images when read from shards; other
            image-likes, e.g. tensors, for scoring outside training).
        masks: the references' subject masks (L), one entry (an image or ``None``) per reference.
        category: the identity's category, if any.
        metadata: the identity's further JSON fields: ``source``, ``license`` (when set) and its extra fields.
        conditioning: the identity's whole precomputed payload (``cond.pth``), opaque here; the model family's
            encoder picks the rows of this condition's prompt with ``prompt_index``.
        prompt_index: the index of ``prompt`` in the identity's prompt list.
        target: the target image of this prompt (``target_<p>.png``: the supervised objectives' data), or ``None``.
        rejected: the rejected image of this prompt (``rejected_<p>.png``: with ``target``, a preference pair), or
            ``None``.
    """

    id: str
    prompt: str
    references: list[Image.Image]
    masks: list[Image.Image | None] | None = None
    category: str | None = None
    metadata: dict = field(default_factory=dict)
    conditioning: object = None
    prompt_index: int = 0
    target: Image.Image | None = None
    rejected: Image.Image | None = None

    def __post_init__(self) -> None:
        self.references, self.masks = normalise_references(self.id, self.references, self.masks)


@dataclass
class ConditionBatch:
    """A batch of conditions, plus how many bad shard samples were skipped to read them (logged, never hidden).

    Attributes:
        conditions: the batch's conditions.
        skipped: the bad shard samples read just before the batch's identities (each bad sample is counted with the
            next good identity, when that identity is used: identities read ahead into a shuffle buffer are counted
            when a batch takes them).
    """

    conditions: list[ConditionSample]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.conditions)


class SkipCounter:
    """Counts (and logs) bad samples; raises if too many come in a row, so a folder of broken shards cannot spin.

    Args:
        max_consecutive: raise after this many bad samples in a row.

    Attributes:
        count: bad samples since the last :meth:`take`.
        consecutive: bad samples since the last good one.
        reasons: the reasons of the bad samples since the last :meth:`take` (each names the shard and the key).
        seen: samples recorded so far, good and bad (a resampled stream that draws shards without this growing is
            drawing empty shards).
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.count = 0
        self.consecutive = 0
        self.reasons: list[str] = []
        self.seen = 0

    def bad(self, reason: str) -> bool:
        """Record (and log) a bad sample; returns ``True`` (webdataset's handler protocol: go on).

        Raises:
            RuntimeError: the ``max_consecutive``-th bad sample in a row.
        """
        self.count += 1
        self.consecutive += 1
        self.seen += 1
        self.reasons.append(reason)
        log.warning("skipping bad shard sample: %s", reason)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} bad shard samples in a row (last: {reason}); the shards look unusable. Check them "
                f"with `python -c \"import webdataset as wds; [print(s['__key__']) for s in wds.WebDataset(URL)]\"` or "
                f"rewrite them with `divrl data`"
            )
        return True  # webdataset handler protocol: continue

    def good(self) -> None:
        """Record a good sample (ends a run of bad ones)."""
        self.consecutive = 0
        self.seen += 1

    def take(self) -> int:
        """The number of bad samples since the last call; clears the count and the reasons."""
        count = self.count
        self.count, self.reasons = 0, []
        return count


def read_identities(urls: Sequence[str], skips: SkipCounter) -> Iterator[IdentityRecord]:
    """Decode identity records from a stream of shard urls; bad tar members and bad samples are skipped and counted."""
    import webdataset as wds

    def handler(err: Exception) -> bool:
        return skips.bad(f"unreadable shard data ({type(err).__name__}: {err})")

    samples = wds.tarfile_to_samples(handler=handler)({"url": u} for u in urls)
    for sample in samples:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            record = IdentityRecord.from_sample(sample)
        except ValueError as err:
            skips.bad(f"{where}: {err}")
            continue
        small = next((i for i, r in enumerate(record.references) if min(r.size) < MIN_SIDE), None)
        if small is not None:  # as divrl data, sample and score refuse them (shards of older versions, or by hand)
            size = record.references[small].size
            skips.bad(
                f"{where}: reference {small} is {size[0]}x{size[1]}; references must be at least "
                f"{MIN_SIDE}x{MIN_SIDE} pixels (no structure to score): rewrite the shards with `divrl data ... "
                f"--resolution 512`"
            )
            continue
        skips.good()
        yield record


def _with_skips(records: Iterator[IdentityRecord], skips: SkipCounter) -> Iterator[tuple[IdentityRecord, int]]:
    """Each record of ``read_identities(..., skips)`` with the number of bad samples read just before it."""
    for record in records:
        yield record, skips.take()


def _bucketed(items: Iterable[tuple[int, object]], batch_size: int) -> Iterator[list]:
    """Batches of ``batch_size`` items of one key from ``(key, item)`` pairs (the key: a number of references), each
    yielded as soon as its bucket is full; when ``items`` ends, the partial buckets in the order they started. With a
    single key: ``batch_size`` items at a time, in order."""
    pending: dict[int, list] = {}
    for key, item in items:
        bucket = pending.setdefault(key, [])
        bucket.append(item)
        if len(bucket) == batch_size:
            yield pending.pop(key)
    yield from pending.values()


def _batch(items: list[tuple[ConditionSample, int]]) -> ConditionBatch:
    """The batch of ``(condition, bad samples read before it)`` pairs."""
    return ConditionBatch([condition for condition, _ in items], sum(skipped for _, skipped in items))


def _shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: keep ``buffer`` items, emit a random one as each new item arrives."""
    pool: list = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def to_condition(record: IdentityRecord, index: int) -> ConditionSample:
    """The condition of ``record`` with its prompt number ``index``: all its references and masks, its further JSON
    fields as ``metadata``, its whole precomputed payload (if any) with ``prompt_index = index``, and the prompt's
    target and rejected images (if any)."""
    metadata = {"source": record.source}
    if record.license is not None:
        metadata["license"] = record.license
    metadata.update(record.extra)
    return ConditionSample(
        record.id,
        record.prompts[index],
        record.references,
        record.masks,
        record.category,
        metadata,
        record.conditioning,
        index,
        record.targets.get(index),
        record.rejected.get(index),
    )


def _served_before(start: int, stream: int, num_streams: int) -> int:
    """How many of the epoch positions ``0 .. start−1`` belong to logical stream ``stream`` (``j mod W``)."""
    return len(range(stream, start, num_streams))


class TrainConditionStream(IterableDataset):
    """The endless, resampled training stream of one rank, cut into epochs of ``steps_per_epoch`` batches, each of
    ``batch_size`` identities with one reference count.

    Args:
        urls: this rank's shards (already split across ranks when there are enough of them).
        batch_size: conditions per batch.
        steps_per_epoch: batches per epoch (the same on every rank, so all ranks run equal steps).
        seed: base seed; the stream of ``(rank, epoch, logical stream)`` is seeded from it.
        rank: the global rank the stream belongs to (captured in ``train_dataloader()``; Lightning does not set
            ``RANK`` in spawned workers).
        shuffle_buffer: identities held in the shuffle buffer.
        max_consecutive_bad: raise after this many bad samples in a row.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        batch_size: int,
        steps_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        shuffle_buffer: int = 64,
        max_consecutive_bad: int = 1000,
    ):
        super().__init__()
        if not urls:
            raise ValueError("TrainConditionStream: no shard urls")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.max_consecutive_bad = max_consecutive_bad
        self.position = 0  # global batch position at which the next iteration starts; set by the DataModule

    def __len__(self) -> int:
        return self.steps_per_epoch  # an iteration resumed mid-epoch yields only the epoch's remaining batches

    def logical_stream(self, epoch: int, stream: int) -> Iterator[ConditionBatch]:
        """The endless batch stream number ``stream`` of ``epoch`` on this rank."""
        rng = random.Random(f"divrl-train/{self.seed}/{self.rank}/{epoch}/{stream}")
        skips = SkipCounter(self.max_consecutive_bad)

        def urls() -> Iterator[str]:
            empty, seen, url = 0, -1, None  # shards drawn in a row with no sample read (all empty: it would spin)
            while True:
                empty, seen = (empty + 1 if skips.seen == seen else 0), skips.seen
                if empty >= self.max_consecutive_bad:
                    raise RuntimeError(
                        f"{empty} shards drawn in a row held no sample (last: {url}; {len(self.urls)} shard(s) in "
                        f"all); the shards look empty: check data.shards, or rewrite them with `divrl data`"
                    )
                url = rng.choice(self.urls)
                yield url

        records = _shuffled(_with_skips(read_identities(urls(), skips), skips), self.shuffle_buffer, rng)
        # a prompt is drawn as each identity leaves the shuffle buffer; the batch of its reference count takes it
        conditions = (
            (len(r.references), (to_condition(r, rng.randrange(len(r.prompts))), skipped)) for r, skipped in records
        )
        yield from map(_batch, _bucketed(conditions, self.batch_size))

    def __iter__(self) -> Iterator[ConditionBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = divmod(self.position, self.steps_per_epoch)
        stream = (start + worker) % workers
        batches = self.logical_stream(epoch, stream)
        for _ in range(_served_before(start, stream, workers)):
            next(batches)
        for _ in range(start + worker, self.steps_per_epoch, workers):
            yield next(batches)


class ValConditionStream(IterableDataset):
    """A fixed validation set, each identity with its first prompt, in shard order (no resampling), in batches of at
    most ``batch_size`` identities of one reference count.

    One process validates the first ``num_identities`` identities. With ``world`` processes every rank reads all the
    shards and takes every ``world``-th of the first ``num_identities · world`` identities, cut to a multiple of
    ``world``: the ranks validate disjoint identities and, above all, the **same number of batches** — under FSDP2
    every transformer forward is a collective, so one rank with an extra batch would wait forever for the others.
    Bucketing by reference count could give the ranks different numbers or sizes of batches (the number of
    micro-batched transformer calls depends on the size): with several processes and several reference counts in the
    set, every batch is one identity, so every rank has the same batches, one per identity. With one reference count
    every rank has the same batches as without bucketing.

    Args:
        urls: the validation shards (all of them, on every rank).
        batch_size: conditions per batch.
        num_identities: identities to validate on, per rank.
        rank, world: this process and the number of processes.
        max_consecutive_bad: raise after this many bad samples in a row.
        what: the setting the shards come from, named when none holds a readable identity.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        batch_size: int,
        num_identities: int,
        rank: int = 0,
        world: int = 1,
        max_consecutive_bad: int = 1000,
        what: str = "data.val_shards",
    ):
        super().__init__()
        self.urls = list(urls)
        self.batch_size = batch_size
        self.num_identities = num_identities
        self.rank, self.world = rank, world
        self.max_consecutive_bad = max_consecutive_bad
        self.what = what

    def __iter__(self) -> Iterator[ConditionBatch]:
        if get_worker_info() is not None and get_worker_info().id > 0:
            return  # one reader: the set is small and must not be duplicated across workers
        skips = SkipCounter(self.max_consecutive_bad)
        records = list(islice(_with_skips(read_identities(self.urls, skips), skips), self.num_identities * self.world))
        if not records:  # validating nothing would end with no metric and no word
            first = f" (first: {skips.reasons[0]})" if skips.reasons else ""
            shards = ", ".join(self.urls[:3]) + (f" and {len(self.urls) - 3} more" if len(self.urls) > 3 else "")
            raise ValueError(
                f"no validation identity could be read from {self.what} ({shards}): {skips.count} bad sample(s) "
                f"skipped{first}; point {self.what} to shards `divrl data` wrote (or set trainer.limit_val_batches: 0)"
            )
        trailing = skips.take()  # bad samples after the last identity read: counted with the last batch
        if self.world > 1 and len(records) < self.world:
            raise ValueError(
                f"{len(records)} validation identities for {self.world} ranks: every rank needs at least one. "
                f"Add identities to data.val_shards (or set trainer.limit_val_batches: 0)"
            )
        end = len(records) - len(records) % self.world
        mixed = self.world > 1 and len({len(r.references) for r, _ in records[:end]}) > 1
        mine = ((len(r.references), (r, skipped)) for r, skipped in records[self.rank : end : self.world])
        batches = list(_bucketed(mine, 1 if mixed else self.batch_size))
        for n, batch in enumerate(batches):
            batch = _batch([(to_condition(record, 0), skipped) for record, skipped in batch])
            batch.skipped += trailing if n == len(batches) - 1 else 0
            yield batch


def split_for_rank(urls: Sequence[str], rank: int, world: int, warn: Callable[[str], None] = log.warning) -> list[str]:
    """The rank's share of the shards (``urls[rank::world]``), so ranks read disjoint data; with fewer shards than
    ranks every rank reads all of them (its stream is still seeded by its rank) and a warning says so."""
    if world <= 1:
        return list(urls)
    if len(urls) < world:
        warn(
            f"{len(urls)} shard(s) for {world} ranks: every rank reads all shards (different random order per rank). "
            f"Write at least {world} shards (`divrl data ... --shard-size`) for disjoint data per rank"
        )
        return list(urls)
    return list(urls[rank::world])

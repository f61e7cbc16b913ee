"""Bad input at the data layer, round two (issue 23): each case failed before with data loss, a silent success, a
wrong count, a Python repr or a torch traceback."""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from divrl.cli import expected_error, main
from divrl.data import converters as C
from divrl.data import synthetic_records, write_shards
from divrl.data.datamodule import IdentityDataModule
from divrl.data.schema import REF_KEY
from divrl.data.stream import SkipCounter, TrainConditionStream, ValConditionStream, read_identities

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"

TEMPLATES = """Classes

subject_name,class
dog,dog
red_can,can

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token)
]
"""


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_raw(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


@pytest.fixture
def old_shards(tmp_path) -> Path:
    out = tmp_path / "shards"
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "3", "--resolution", "32"]) == 0
    return out


@pytest.fixture
def empty_psrbench(tmp_path) -> Path:
    src = tmp_path / "PSRBench"
    src.mkdir()
    (src / "Attribute.json").write_text("[]")
    return src


@pytest.fixture
def unreadable_dreambooth(tmp_path) -> Path:
    src = tmp_path / "dreambooth"
    for subject in ("dog", "red_can"):
        (src / subject).mkdir(parents=True)
        (src / subject / "00.jpg").write_bytes(b"not a jpeg")
    (src / "prompts_and_classes.txt").write_text(TEMPLATES)
    return src


# ------------------------------------------------------------------------------------------- 1, 2: nothing converted


@pytest.mark.parametrize("source", ["psrbench", "dreambooth"])
def test_an_overwrite_that_converts_nothing_leaves_the_old_shards_byte_for_byte(
    source, old_shards, empty_psrbench, unreadable_dreambooth, capsys
):
    before = files(old_shards)
    src = empty_psrbench if source == "psrbench" else unreadable_dreambooth
    capsys.readouterr()
    assert main(["data", source, "--src", str(src), "--out", str(old_shards), "--overwrite"]) == 1
    assert files(old_shards) == before  # same files, same bytes, no hidden folder left
    assert sorted(p.name for p in old_shards.iterdir()) == sorted(before)
    err = capsys.readouterr().err
    assert f"nothing was converted from --src {src}" in err and "cannot write" not in err
    assert f"--out {old_shards} was left as it was" in err


def test_a_conversion_of_zero_identities_fails_and_writes_nothing(
    tmp_path, empty_psrbench, unreadable_dreambooth, capsys
):
    out = tmp_path / "new"
    assert main(["data", "psrbench", "--src", str(empty_psrbench), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"divrl data psrbench: nothing was converted from --src {empty_psrbench}: it lists no item; check "
        f"the source (--out {out} was left as it was)"
    )
    assert not out.exists()

    assert main(["data", "dreambooth", "--src", str(unreadable_dreambooth), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"divrl data dreambooth: nothing was converted from --src {unreadable_dreambooth}: 2 "
        f"item(s) skipped (first: {unreadable_dreambooth / 'dog' / '00.jpg'}: unreadable image"
    )
    assert str(unreadable_dreambooth / "red_can" / "00.jpg") in err and len(err.splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------------------- 3: --src for synthetic


def test_synthetic_refuses_src_like_the_other_misplaced_flags(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "synthetic", "--src", str(tmp_path), "--out", str(out), "--num-identities", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "divrl data synthetic: --src applies only to other sources (--src: every source but "
        "synthetic, whose world is generated;"
    ) and err.rstrip().endswith("nothing was written")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- 4, 5: shard samples


def test_prompts_that_are_a_string_or_a_json_that_is_not_an_object_are_named(tmp_path, caplog):
    good, text_prompts, listed = (r.to_sample() for r in synthetic_records(3, size=16, prompts_per_identity=1))
    text_prompts["json"] = json.dumps({"id": text_prompts["__key__"], "prompts": "a photo"}).encode()
    listed["json"] = b'["a photo"]'
    url = write_raw(tmp_path / "bad.tar", [text_prompts, listed, good])
    with caplog.at_level(logging.WARNING, logger="divrl.data.stream"):
        (batch,) = ValConditionStream([url], batch_size=4, num_identities=4)
    assert [c.id for c in batch.conditions] == [good["__key__"]] and batch.skipped == 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        f"skipping bad shard sample: {url}:{text_prompts['__key__']}: shard sample "
        f"{text_prompts['__key__']!r}: 'prompts' in 'json' must be a JSON list of strings, got a str "
        f"('a photo'); write it as [\"...\", ...] (divrl data does)"
    )
    assert lines[1] == (
        f"skipping bad shard sample: {url}:{listed['__key__']}: shard sample {listed['__key__']!r}: "
        f'\'json\' holds a JSON list, not the object of the schema ({{"id", "prompts": [...], '
        f"...}}); rewrite the shard with `divrl data`"
    )


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_corrupt_image_is_named_by_shard_key_and_entry_without_a_python_repr(tmp_path, caplog):
    samples = [r.to_sample() for r in synthetic_records(3, size=16, prompts_per_identity=1)]
    samples[0][REF_KEY] = b"not a png"
    samples[1]["mask.png"] = png(Image.new("L", (16, 16), 255))[:40]  # a truncated PNG
    url = write_raw(tmp_path / "bad.tar", samples)
    with caplog.at_level(logging.WARNING, logger="divrl.data.stream"):
        (batch,) = ValConditionStream([url], batch_size=4, num_identities=4)
    assert [c.id for c in batch.conditions] == [samples[2]["__key__"]] and batch.skipped == 2
    first, second = (r.getMessage() for r in caplog.records)
    assert first == (
        f"skipping bad shard sample: {url}:{samples[0]['__key__']}: shard sample "
        f"{samples[0]['__key__']!r}: 'ref.png' is not a readable image (not a PNG, JPEG or other image "
        f"format PIL reads); rewrite the shard with `divrl data`"
    )
    assert (
        f"{url}:{samples[1]['__key__']}: shard sample {samples[1]['__key__']!r}: 'mask.png' is not a readable "
        f"image (" in second
    )
    assert "BytesIO" not in first + second and " at 0x" not in first + second
    # the converters' reader of image bytes (SynCD's parquet copy) alike
    skip = C._open_image(b"junk", "RGB", "syncd.parquet#row3 column 'image'")
    assert (skip.where, skip.reason) == (
        "syncd.parquet#row3 column 'image'",
        "unreadable image (not a PNG, JPEG or other image format PIL reads)",
    )


# ------------------------------------------------------------------------------------------- 6: skip counts


@pytest.fixture
def shard_with_bad_samples(tmp_path) -> tuple[str, list[str]]:
    """Eight good identities with three corrupt samples between the second and the third."""
    good = [r.to_sample() for r in synthetic_records(8, size=16, prompts_per_identity=2)]
    bad = [dict(good[0], **{"__key__": f"broken_{n}", REF_KEY: b"junk"}) for n in range(3)]
    url = write_raw(tmp_path / "mixed.tar", good[:2] + bad + good[2:])
    return url, [s["__key__"] for s in good]


def test_skipped_samples_count_what_training_consumed_not_the_shuffle_buffer_read_ahead(shard_with_bad_samples):
    url, ids = shard_with_bad_samples
    after_the_bad = ids[2]  # the three bad samples are counted with the identity read after them, when it is used

    def stream(**kw):
        return TrainConditionStream([url], batch_size=2, steps_per_epoch=40, seed=3, **kw).logical_stream(0, 0)

    first = next(stream())  # the default shuffle buffer (64) reads 8 passes of the shard ahead
    assert first.skipped == 3 * [c.id for c in first.conditions].count(after_the_bad)
    batches = [next(b) for b in [stream()] for _ in range(40)]
    assert [b.skipped for b in batches] == [3 * [c.id for c in b.conditions].count(after_the_bad) for b in batches]
    assert sum(b.skipped for b in batches) > 0
    in_order = stream(shuffle_buffer=1)  # no shuffling: one pass of the shard is 4 batches
    assert [next(in_order).skipped for _ in range(4)] == [0, 3, 0, 0]


def test_validation_counts_the_bad_samples_of_each_batch(shard_with_bad_samples):
    url, ids = shard_with_bad_samples
    batches = list(ValConditionStream([url], batch_size=2, num_identities=8))
    assert [[c.id for c in b.conditions] for b in batches] == [ids[0:2], ids[2:4], ids[4:6], ids[6:8]]
    assert [b.skipped for b in batches] == [0, 3, 0, 0]


# ------------------------------------------------------------------------------------------- 7: DataModule settings


@pytest.mark.parametrize(
    ("key", "value", "low"),
    [
        ("num_workers", -1, 0),
        ("val_identities", 0, 1),
        ("shuffle_buffer", 0, 1),
        ("max_consecutive_bad", 0, 1),
        ("batch_size", 0, 1),
        ("steps_per_epoch", -2, 1),
    ],
)
def test_invalid_datamodule_settings_are_refused_naming_the_key(key, value, low):
    with pytest.raises(ValueError) as raised:
        IdentityDataModule("data/demo", **{key: value})
    message = f"data.{key} must be >= {low}, got {value}: set it in the config's data: section or with --data.{key}" + (
        " (to validate nothing, set trainer.limit_val_batches: 0)" if key == "val_identities" else ""
    )
    assert str(raised.value) == message
    assert expected_error(raised.value) == message  # printed alone by the console script, without a traceback


# ------------------------------------------------------------------------------------------- 8: reference counts


def mixed_records(counts: list[int]) -> list:
    """Identities with the given numbers of references (1 or 2), in this order."""
    records = synthetic_records(len(counts), size=16, prompts_per_identity=2, references_per_identity=2, seed=5)
    return [replace(r, references=r.references[:k], masks=r.masks[:k]) for r, k in zip(records, counts, strict=True)]


@pytest.fixture
def mixed_shards(tmp_path) -> tuple[list[str], dict[str, int]]:
    records = mixed_records([1, 2, 2, 1, 1, 2, 1, 1, 2, 2, 1, 2])
    urls = [str(p) for p in write_shards(records, tmp_path / "mixed", shard_size=4)]
    return urls, {r.id: len(r.references) for r in records}


def conditions(batches) -> list[list[tuple[str, str, int]]]:
    return [[(c.id, c.prompt, c.prompt_index) for c in b.conditions] for b in batches]


def test_training_batches_hold_one_reference_count_and_reach_every_identity(mixed_shards):
    urls, counts = mixed_shards
    batches = list(TrainConditionStream(urls, batch_size=3, steps_per_epoch=30, seed=2))
    assert len(batches) == 30 and all(len(b) == 3 for b in batches)
    assert all(len({len(c.references) for c in b.conditions}) == 1 for b in batches)
    assert all(len(c.references) == counts[c.id] for b in batches for c in b.conditions)
    assert {c.id for b in batches for c in b.conditions} == set(counts)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bucketed_stream_started_mid_epoch_continues_the_uninterrupted_one(mixed_shards, workers):
    urls, _ = mixed_shards

    def run(position):
        stream = TrainConditionStream(urls, batch_size=2, steps_per_epoch=6, seed=1)
        stream.position = position
        return conditions(DataLoader(stream, batch_size=None, collate_fn=lambda b: b, num_workers=workers))

    full = run(0) + run(6)
    for start in (1, 3, 6 + 4):
        assert run(start) == full[start : (start // 6 + 1) * 6], f"resume at batch {start} diverged"


def unbucketed_stream(stream: TrainConditionStream, epoch: int, index: int):
    """``TrainConditionStream.logical_stream`` before batches were bucketed by reference count: ``batch_size``
    records at a time from the shuffle buffer, a prompt drawn after each (the code as it was, with its own shuffle)."""
    rng = random.Random(f"divrl-train/{stream.seed}/{stream.rank}/{epoch}/{index}")

    def urls():
        while True:
            yield rng.choice(stream.urls)

    def shuffled(items):
        pool = []
        for item in items:
            pool.append(item)
            if len(pool) >= stream.shuffle_buffer:
                yield pool.pop(rng.randrange(len(pool)))

    records = shuffled(read_identities(urls(), SkipCounter(10)))
    while True:
        yield [
            (r.id, r.prompts[i], i) for r in islice(records, stream.batch_size) for i in [rng.randrange(len(r.prompts))]
        ]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_single_reference_count_batches_are_exactly_those_before_bucketing(batch_size):
    urls = sorted(str(p) for p in DEMO.glob("train-*.tar"))
    for seed, rank, epoch, index in ((0, 0, 0, 0), (7, 1, 2, 1)):
        stream = TrainConditionStream(urls, batch_size=batch_size, steps_per_epoch=12, seed=seed, rank=rank)
        new, old = stream.logical_stream(epoch, index), unbucketed_stream(stream, epoch, index)
        assert conditions(islice(new, 12)) == list(islice(old, 12)), (seed, rank, epoch, index)


def shard_urls(records, folder: Path) -> list[str]:
    return [str(p) for p in write_shards(records, folder, shard_size=4)]


def val_ids(urls, world, rank, **kw) -> list[list[int]]:
    batches = ValConditionStream(urls, rank=rank, world=world, **kw)
    assert all(len({len(c.references) for c in b.conditions}) == 1 for b in batches)
    return [[int(c.id.rsplit("_", 1)[1]) for c in b.conditions] for b in batches]


def test_validation_batches_hold_one_reference_count_and_every_rank_the_same_number(tmp_path):
    one = shard_urls(mixed_records([1, 2, 2, 1, 1, 2, 1]), tmp_path / "one")
    assert val_ids(one, 1, 0, batch_size=2, num_identities=7) == [[1, 2], [0, 3], [4, 6], [5]]
    two = shard_urls(mixed_records([1, 1, 1, 2, 1, 1, 1, 2]), tmp_path / "two")
    # rank 0 holds four 1-reference identities, rank 1 two of each count: bucketing would give rank 0 one batch and
    # rank 1 two (a hang under FSDP2); with several ranks and counts every batch is one identity, on every rank
    assert [val_ids(two, 2, r, batch_size=4, num_identities=4) for r in (0, 1)] == [
        [[0], [2], [4], [6]],
        [[1], [3], [5], [7]],
    ]
    three = shard_urls(mixed_records([1, 1, 2, 1, 2, 2, 1, 1, 2]), tmp_path / "three")
    assert [val_ids(three, 3, r, batch_size=3, num_identities=3) for r in (0, 1, 2)] == [
        [[0], [3], [6]],
        [[1], [4], [7]],
        [[2], [5], [8]],
    ]
    single = sorted(str(p) for p in DEMO.glob("val-*.tar"))  # one reference count: the batches as before
    assert val_ids(single, 1, 0, batch_size=3, num_identities=8) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [val_ids(single, 2, r, batch_size=3, num_identities=4) for r in (0, 1)] == [
        [[0, 2, 4], [6]],
        [[1, 3, 5], [7]],
    ]

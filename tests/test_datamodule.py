"""The identity DataModule and its condition streams: paths, determinism, resume, rank split, and bad shards."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from divrl.data import synthetic_records, write_shards
from divrl.data.datamodule import IdentityDataModule, resolve_shards
from divrl.data.schema import COND_KEY, REF_KEY
from divrl.data.stream import ConditionSample, TrainConditionStream, ValConditionStream, split_for_rank
from divrl.data.synthetic import (
    DEMO_TRAIN_IDENTITIES,
    DEMO_VAL_IDENTITIES,
    write_demo_dataset,
)

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("shards")
    return [str(p) for p in write_shards(synthetic_records(12, size=16, prompts_per_identity=3), out, shard_size=4)]


def keys(batches) -> list[list[tuple[str, str]]]:
    return [[(c.id, c.prompt) for c in b.conditions] for b in batches]


def stream(urls, position=0, **kw) -> TrainConditionStream:
    s = TrainConditionStream(urls, batch_size=kw.pop("batch_size", 2), steps_per_epoch=kw.pop("steps", 6), **kw)
    s.position = position
    return s


def test_resolve_shards_accepts_folders_globs_braces_and_lists(shards):
    folder = str(Path(shards[0]).parent)
    assert resolve_shards(folder) == shards
    assert resolve_shards(f"{folder}/shard-*.tar") == shards
    assert resolve_shards(f"{folder}/shard-{{000000..000002}}.tar") == shards
    assert resolve_shards(shards[:2]) == shards[:2]


def test_missing_and_empty_shard_folders_fail_with_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder '.*nowhere' does not exist.*divrl data"):
        resolve_shards(str(tmp_path / "nowhere"), "data.shards")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.shards: folder '.*empty' holds no .tar shards"):
        resolve_shards(str(tmp_path / "empty"), "data.shards")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_shards(str(tmp_path / "x-*.tar"))


def test_the_stream_is_deterministic_and_draws_prompts_from_each_identity(shards):
    first, again = keys(stream(shards, seed=3)), keys(stream(shards, seed=3))
    other = keys(stream(shards, seed=4))
    assert first == again and first != other
    assert len(first) == 6 and all(len(b) == 2 for b in first)
    prompts = {r.id: r.prompts for r in synthetic_records(12, size=16, prompts_per_identity=3)}
    assert all(prompt in prompts[key] for batch in first for key, prompt in batch)
    # resampled: every identity and more than one prompt per identity show up over a few epochs
    seen = [pair for epoch in range(8) for b in keys(stream(shards, position=6 * epoch, seed=3)) for pair in b]
    assert {k for k, _ in seen} == set(prompts) and len(set(seen)) > len(prompts)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_iteration_started_mid_epoch_continues_the_uninterrupted_stream(shards, workers):
    def run(position):
        loader = DataLoader(
            stream(shards, position, seed=1), batch_size=None, collate_fn=lambda b: b, num_workers=workers
        )
        return keys(loader)

    full = run(0) + run(6)  # two whole epochs
    for start in (1, 3, 6 + 4):
        resumed = run(start)
        epoch_end = (start // 6 + 1) * 6
        assert resumed == full[start:epoch_end], f"resume at batch {start} diverged"


def test_ranks_get_disjoint_shards_and_few_shards_are_shared_with_a_warning(shards):
    parts = [split_for_rank(shards, r, 2) for r in range(2)]
    assert set(parts[0]).isdisjoint(parts[1]) and sorted(parts[0] + parts[1]) == sorted(shards)
    warnings = []
    assert split_for_rank(shards, 1, 4, warn=warnings.append) == shards
    assert "3 shard(s) for 4 ranks" in warnings[0]
    ids = [{k for b in keys(stream(p, rank=r)) for k, _ in b} for r, p in enumerate(parts)]
    assert ids[0].isdisjoint(ids[1])


def _write_raw(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def test_corrupt_images_and_identities_without_prompts_are_skipped_counted_and_named(tmp_path, caplog):
    good = [r.to_sample() for r in synthetic_records(3, size=16, prompts_per_identity=2)]
    broken_image = dict(good[1], **{REF_KEY: b"not a png"})
    no_prompts = dict(good[2], json=json.dumps({"id": good[2]["__key__"], "prompts": []}).encode())
    url = _write_raw(tmp_path / "bad.tar", [good[0], broken_image, no_prompts])
    with caplog.at_level(logging.WARNING, logger="divrl.data.stream"):
        batches = list(ValConditionStream([url], batch_size=4, num_identities=4))
    assert [c.id for c in batches[0].conditions] == [good[0]["__key__"]]
    assert batches[0].skipped == 2
    text = caplog.text
    assert f"bad.tar:{good[1]['__key__']}" in text and "not a readable image" in text
    assert f"bad.tar:{good[2]['__key__']}" in text and "needs at least one non-empty prompt" in text


def test_a_truncated_shard_is_skipped_and_a_wholly_broken_dataset_stops_with_an_error(tmp_path, shards):
    data = Path(shards[0]).read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    batches = list(ValConditionStream([str(truncated), shards[1]], batch_size=8, num_identities=8))
    assert sum(len(b) for b in batches) >= 4  # the second shard's identities still arrive
    assert sum(b.skipped for b in batches) >= 1

    garbage = tmp_path / "garbage.tar"
    _write_raw(garbage, [{"__key__": f"x{i}", REF_KEY: b"junk", "json": b"{}"} for i in range(5)])
    with pytest.raises(RuntimeError, match="bad shard samples in a row"):
        next(iter(stream([str(garbage)], max_consecutive_bad=5)))


def test_datamodule_counts_consumed_batches_and_restores_the_position(shards):
    dm = IdentityDataModule(shards, batch_size=2, steps_per_epoch=6, seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    full = keys(loader)
    dm.position = 4  # what on_before_batch_transfer counts during training, restored from a checkpoint
    assert keys(dm.train_dataloader()) == full[4:]
    state = dm.state_dict()
    fresh = IdentityDataModule(shards, batch_size=2, steps_per_epoch=6, seed=5)
    fresh.load_state_dict(state)
    assert fresh.position == 4
    with pytest.warns(UserWarning, match="batch_size 2 -> 3"):
        IdentityDataModule(shards, batch_size=3, steps_per_epoch=6, seed=5).load_state_dict(state)


def test_the_committed_demo_dataset_is_what_the_generator_writes(tmp_path):
    assert sorted(p.name for p in DEMO.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    write_demo_dataset(tmp_path)

    def decoded(folder, pattern):
        return [
            (s["__key__"], s["json"], s["ref.png"], s["mask.png"])
            for s in wds.WebDataset(sorted(str(p) for p in Path(folder).glob(pattern)), shardshuffle=False)
        ]

    for pattern, count in (("train-*.tar", DEMO_TRAIN_IDENTITIES), ("val-*.tar", DEMO_VAL_IDENTITIES)):
        committed, regenerated = decoded(DEMO, pattern), decoded(tmp_path, pattern)
        assert len(committed) == count and committed == regenerated
    for shard in DEMO.glob("*.tar"):  # byte for byte: regenerating the demo data leaves git clean
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_validation_gives_every_rank_the_same_number_of_batches_of_disjoint_identities(tmp_path):
    records = list(synthetic_records(5, size=16, prompts_per_identity=1))
    uneven = [
        _write_raw(tmp_path / "a.tar", [r.to_sample() for r in records[:4]]),
        _write_raw(tmp_path / "b.tar", [records[4].to_sample()]),
    ]
    for wanted, per_rank in ((1, 1), (2, 2), (8, 2)):  # 8 per rank asked, 5 exist: 4 usable, 2 each
        ranks = [
            [
                c.id
                for b in ValConditionStream(uneven, batch_size=1, num_identities=wanted, rank=r, world=2)
                for c in b.conditions
            ]
            for r in (0, 1)
        ]
        assert [len(ids) for ids in ranks] == [per_rank, per_rank]
        assert set(ranks[0]).isdisjoint(ranks[1])
    assert ranks[0] == [records[0].id, records[2].id] and ranks[1] == [records[1].id, records[3].id]
    with pytest.raises(ValueError, match="2 validation identities for 3 ranks"):
        list(ValConditionStream(uneven[1:] + uneven[1:], batch_size=1, num_identities=1, rank=0, world=3))


# ------------------------------------------------------------------------------------------------ several references


def same_pixels(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a), np.asarray(b))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_identities_with_several_references_reach_the_stream_intact(tmp_path):
    r = list(synthetic_records(4, size=16, prompts_per_identity=3, references_per_identity=3, seed=9))
    records = [
        replace(r[0], references=r[0].references[:2], masks=[r[0].masks[0], None], category="animal"),  # K = 2
        replace(r[1], masks=[r[1].masks[0], None, r[1].masks[2]]),  # K = 3, reference 1 without a mask
        r[2],  # K = 3, every mask
        replace(r[3], references=r[3].references[:1], masks=None, license=None, extra={"photographer": "ann"}),
    ]
    write_shards(records, tmp_path, shard_size=3)
    dm = IdentityDataModule(str(tmp_path), val_shards=str(tmp_path), batch_size=2, steps_per_epoch=8, seed=1)
    dm.setup("fit")
    conditions = [c for loader in (dm.train_dataloader(), dm.val_dataloader()) for b in loader for c in b.conditions]
    by_id = {record.id: record for record in records}
    assert {c.id for c in conditions} == set(by_id)
    for c in conditions:
        want = by_id[c.id]
        assert len(c.references) == len(c.masks) == len(want.references)
        assert all(same_pixels(a, b) for a, b in zip(c.references, want.references, strict=True)), c.id
        assert all(same_pixels(a, b) for a, b in zip(c.masks, want.masks, strict=True)), c.id
        assert c.category == want.category and c.prompt == want.prompts[c.prompt_index]
        assert c.reference is c.references[0] and c.mask is c.masks[0]
    metadata = {c.id: c.metadata for c in conditions}
    assert metadata[records[3].id] == {"source": "synthetic", "photographer": "ann"}  # no licence: no key
    assert metadata[records[2].id] == {"source": "synthetic", "license": "CC0-1.0", **records[2].extra}
    assert [len(c.references) for c in conditions if c.id == records[0].id][0] == 2
    assert [c.category for c in conditions if c.id == records[0].id][0] == "animal"


def test_the_further_json_fields_of_a_shard_become_the_metadata(tmp_path):
    (record,) = synthetic_records(1, size=16, prompts_per_identity=1)
    meta = {
        "id": record.id,
        "prompts": ["a prompt"],
        "source": "web",
        "license": "MIT",
        "views": ["1.jpg"],
        "photographer": {"name": "ann"},
    }
    url = _write_raw(
        tmp_path / "meta.tar",
        [{"__key__": record.id, REF_KEY: png(record.reference), "json": json.dumps(meta).encode()}],
    )
    (batch,) = ValConditionStream([url], batch_size=1, num_identities=1)
    assert batch.conditions[0].metadata == {
        "source": "web",
        "license": "MIT",
        "views": ["1.jpg"],
        "photographer": {"name": "ann"},
    }


def test_orphan_or_mis_sized_masks_and_bad_payloads_are_skipped_counted_and_named(tmp_path, caplog):
    good = [r.to_sample() for r in synthetic_records(5, size=16, prompts_per_identity=2, references_per_identity=2)]
    saved = io.BytesIO()
    torch.save([torch.zeros(2)], saved)
    small_mask = png(Image.new("L", (8, 8), 255))
    bad = {
        "'mask_1.png' has no reference: 'ref_1.png' is absent": {k: v for k, v in good[1].items() if k != "ref_1.png"},
        "mask 1 has size (8, 8) but reference 1 has size (16, 16)": dict(good[2], **{"mask_1.png": small_mask}),
        "'cond.pth' holds a list, not the dict": dict(good[3], **{COND_KEY: saved.getvalue()}),
        "'cond.pth' is not a readable conditioning file": dict(good[4], **{COND_KEY: b"not a torch file"}),
    }
    url = _write_raw(tmp_path / "bad.tar", [good[0], *bad.values()])
    with caplog.at_level(logging.WARNING, logger="divrl.data.stream"):
        batches = list(ValConditionStream([url], batch_size=8, num_identities=8))
    assert [c.id for b in batches for c in b.conditions] == [good[0]["__key__"]]
    assert sum(b.skipped for b in batches) == 4
    for reason, sample in bad.items():
        lines = [line for line in caplog.text.splitlines() if reason in line]
        assert len(lines) == 1 and f"bad.tar:{sample['__key__']}: " in lines[0], reason  # named with its sample


def test_a_condition_carries_the_whole_payload_and_the_index_of_its_drawn_prompt(tmp_path):
    records = list(synthetic_records(3, size=16, prompts_per_identity=4))
    for n, record in enumerate(records):
        record.conditioning = {"model": "fake", "prompts": list(record.prompts), "rows": torch.arange(4) + 10 * n}
    urls = [str(p) for p in write_shards(records, tmp_path, shard_size=2)]
    by_id = {record.id: record for record in records}
    conditions = [c for b in stream(urls, steps=8, seed=2) for c in b.conditions]
    assert len({c.prompt_index for c in conditions}) > 1  # several prompts drawn
    for c in conditions:
        payload = by_id[c.id].conditioning
        assert c.conditioning.keys() == payload.keys() and torch.equal(c.conditioning["rows"], payload["rows"])  # whole
        assert c.conditioning["prompts"][c.prompt_index] == c.prompt  # the index picks the drawn prompt's row
    (first,) = next(iter(ValConditionStream(urls, batch_size=1, num_identities=1))).conditions
    assert first.prompt_index == 0 and first.conditioning["prompts"][0] == first.prompt


def test_a_condition_sample_normalises_its_references_like_an_identity_record():
    image, mask, other = Image.new("RGB", (8, 6)), Image.new("L", (8, 6)), Image.new("RGB", (4, 4))
    one = ConditionSample("a", "p", image, mask, "object")  # the single-reference form, positionally
    assert one.references == [image] and one.masks == [mask] and one.reference is image and one.mask is mask
    assert (one.category, one.metadata, one.conditioning, one.prompt_index) == ("object", {}, None, 0)
    assert ConditionSample("b", "p", [image, other]).masks == [None, None]
    assert ConditionSample("c", "p", [image, other], mask).masks == [mask, None]
    with pytest.raises(ValueError, match=r"identity 'd': mask 1 has size \(8, 6\) but reference 1 has size \(4, 4\)"):
        ConditionSample("d", "p", [image, other], [mask, mask])

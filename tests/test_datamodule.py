"""The identity DataModule and its condition streams: paths, determinism, resume, rank split, and bad shards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from divrl.data import synthetic_records, write_shards
from divrl.data.datamodule import IdentityDataModule, resolve_shards
from divrl.data.schema import REF_KEY
from divrl.data.stream import TrainConditionStream, ValConditionStream, split_for_rank
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
        loader = DataLoader(stream(shards, position, seed=1), batch_size=None, collate_fn=lambda b: b,
                            num_workers=workers)  # fmt: skip
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
        return [(s["__key__"], s["json"], s["ref.png"], s["mask.png"]) for s in wds.WebDataset(
            sorted(str(p) for p in Path(folder).glob(pattern)), shardshuffle=False)]  # fmt: skip

    for pattern, count in (("train-*.tar", DEMO_TRAIN_IDENTITIES), ("val-*.tar", DEMO_VAL_IDENTITIES)):
        committed, regenerated = decoded(DEMO, pattern), decoded(tmp_path, pattern)
        assert len(committed) == count and committed == regenerated


def test_validation_gives_every_rank_the_same_number_of_batches_of_disjoint_identities(tmp_path):
    records = list(synthetic_records(5, size=16, prompts_per_identity=1))
    uneven = [_write_raw(tmp_path / "a.tar", [r.to_sample() for r in records[:4]]),
              _write_raw(tmp_path / "b.tar", [records[4].to_sample()])]  # fmt: skip
    for wanted, per_rank in ((1, 1), (2, 2), (8, 2)):  # 8 per rank asked, 5 exist: 4 usable, 2 each
        ranks = [[c.id for b in ValConditionStream(uneven, batch_size=1, num_identities=wanted, rank=r, world=2)
                  for c in b.conditions] for r in (0, 1)]  # fmt: skip
        assert [len(ids) for ids in ranks] == [per_rank, per_rank]
        assert set(ranks[0]).isdisjoint(ranks[1])
    assert ranks[0] == [records[0].id, records[2].id] and ranks[1] == [records[1].id, records[3].id]
    with pytest.raises(ValueError, match="2 validation identities for 3 ranks"):
        list(ValConditionStream(uneven[1:] + uneven[1:], batch_size=1, num_identities=1, rank=0, world=3))

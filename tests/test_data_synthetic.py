"""The identity shard schema and the synthetic subject world."""

import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from divrl.data import IdentityRecord, check_identity_id, synthetic_records, write_shards
from divrl.data.synthetic import Pose, SubjectIdentity, render
from divrl.images import to_image_batch, to_mask_batch
from divrl.rewards import FeatureScorer, GatedReward
from divrl.rewards.backbones import DenseDescriptor


def test_records_are_deterministic_distinct_and_masked():
    a = list(synthetic_records(12, size=64, seed=3))
    b = list(synthetic_records(12, size=64, seed=3))
    assert [r.id for r in a] == [f"synth_{i:05d}" for i in range(12)]
    assert [r.prompts for r in a] == [r.prompts for r in b]
    assert all(np.array_equal(np.asarray(x.reference), np.asarray(y.reference)) for x, y in zip(a, b))
    identities = {(r.extra["kind"], tuple(r.extra["colours"]), r.extra["texture"]) for r in a}
    assert len(identities) == 12
    for record in a:
        image = to_image_batch(record.reference)[0]
        mask = to_mask_batch(record.mask)[0] > 0.5
        assert 0.02 < mask.float().mean() < 0.6  # a visible subject, not the whole frame
        background = image[:, ~mask]
        assert torch.allclose(background, torch.full_like(background, 0.5), atol=1 / 255)
        name = " ".join(record.extra["colours"][:1])
        assert all(name in p and record.extra["kind"] in p for p in record.prompts)
    assert list(synthetic_records(3, seed=4))[0].prompts != a[0].prompts


def test_shards_round_trip_through_webdataset(tmp_path):
    records = list(synthetic_records(5, size=48, seed=0))
    paths = write_shards(records, tmp_path, shard_size=2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(paths[0]) as tar:
        assert sorted(tar.getnames()) == sorted(f"synth_0000{i}.{ext}" for i in (0, 1) for ext in ("ref.png", "mask.png", "json"))
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False)
    loaded = [IdentityRecord.from_sample(sample) for sample in dataset]
    assert [r.id for r in loaded] == [r.id for r in records]
    for got, want in zip(loaded, records):
        assert np.array_equal(np.asarray(got.reference), np.asarray(want.reference))
        assert np.array_equal(np.asarray(got.mask), np.asarray(want.mask))
        assert got.prompts == want.prompts and got.source == "synthetic" and got.license == "CC0-1.0"
        assert got.extra == want.extra


def test_interrupted_writes_leave_no_partial_shard(tmp_path):
    def records_then_crash():
        yield from synthetic_records(3, size=32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(records_then_crash(), tmp_path, shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]

    class Broken(IdentityRecord):
        def to_sample(self):
            raise OSError("disk full")

    good = list(synthetic_records(1, size=32))[0]
    broken = Broken(id="broken", reference=good.reference, prompts=["p"])
    with pytest.raises(OSError, match="disk full"):
        write_shards([good, broken], tmp_path / "b", shard_size=5)
    assert list((tmp_path / "b").iterdir()) == []


def test_schema_errors_name_the_input():
    good = list(synthetic_records(1, size=32))[0]
    with pytest.raises(ValueError, match="cannot be a shard key.*'dog_1'"):
        check_identity_id("dog.1")
    with pytest.raises(ValueError, match="non-empty prompt"):
        IdentityRecord(id="x", reference=good.reference, prompts=[" "])
    sample = good.to_sample()
    with pytest.raises(ValueError, match="no 'ref.png'"):
        IdentityRecord.from_sample({k: v for k, v in sample.items() if k != "ref.png"})
    with pytest.raises(ValueError, match="'ref.png' is not a readable image"):
        IdentityRecord.from_sample({**sample, "ref.png": b"\x89PNG truncated"})
    with pytest.raises(ValueError, match="not valid JSON"):
        IdentityRecord.from_sample({**sample, "json": b"{oops"})


def test_the_world_separates_structure_from_identity():
    """Re-posing a subject earns nSSM and keeps VSM; recolouring it keeps the layout and loses identity."""
    subject = SubjectIdentity("star", ("red", "yellow"), "stripes")
    reference, mask = render(subject, Pose(0.5, 0.5, 0.3, 0.0))
    variants = [
        render(subject, Pose(0.35, 0.6, 0.22, 0.8)),
        render(SubjectIdentity("star", ("blue", "teal"), "stripes"), Pose(0.5, 0.5, 0.3, 0.0)),
    ]
    images = torch.stack([v[0] for v in variants])
    out = GatedReward(FeatureScorer(DenseDescriptor()))(reference, images, ref_mask=mask, gen_masks=torch.stack([v[1] for v in variants]))
    moved, recoloured = 0, 1
    assert out.nssm[moved] > 0.5 and out.vsm[moved] > 0.8 and not out.penalized[moved]
    assert out.nssm[recoloured] < 0.1 and out.vsm[recoloured] < 0.2 and out.penalized[recoloured]

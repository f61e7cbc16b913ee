"""The identity shard schema and the synthetic subject world."""

import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

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
        assert sorted(tar.getnames()) == sorted(
            f"synth_0000{i}.{ext}" for i in (0, 1) for ext in ("ref.png", "mask.png", "json")
        )
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
    broken = Broken(id="broken", references=good.references, prompts=["p"])
    with pytest.raises(OSError, match="disk full"):
        write_shards([good, broken], tmp_path / "b", shard_size=5)
    assert list((tmp_path / "b").iterdir()) == []


def test_schema_errors_name_the_input():
    good = list(synthetic_records(1, size=32))[0]
    with pytest.raises(ValueError, match="cannot be a shard key.*'dog_1'"):
        check_identity_id("dog.1")
    with pytest.raises(ValueError, match="non-empty prompt"):
        IdentityRecord(id="x", references=good.references, prompts=[" "])
    sample = good.to_sample()
    with pytest.raises(ValueError, match="no 'ref.png'"):
        IdentityRecord.from_sample({k: v for k, v in sample.items() if k != "ref.png"})
    with pytest.raises(ValueError, match="'ref.png' is not a readable image"):
        IdentityRecord.from_sample({**sample, "ref.png": b"\x89PNG truncated"})
    with pytest.raises(ValueError, match="not valid JSON"):
        IdentityRecord.from_sample({**sample, "json": b"{oops"})
    black = IdentityRecord("x", good.references, good.prompts, Image.new("L", good.reference.size)).to_sample()
    with pytest.raises(ValueError, match=r"'mask.png' is empty \(no subject pixel\)"):  # nothing to score against
        IdentityRecord.from_sample(black)


def same_pixels(a: Image.Image | None, b: Image.Image | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_a_single_image_is_one_reference_and_masks_follow_the_references():
    image, mask, small = Image.new("RGB", (8, 6), (9, 9, 9)), Image.new("L", (8, 6), 255), Image.new("RGB", (4, 4))
    one = IdentityRecord("a", image, ["p"], mask)  # the single-reference form, positionally
    assert one.references == [image] and one.masks == [mask] and one.reference is image and one.mask is mask
    assert IdentityRecord("b", [image, small], ["p"], mask).masks == [mask, None]  # a single mask is the first's
    assert IdentityRecord("c", [image, small], ["p"]).masks == [None, None]
    assert IdentityRecord("d", [image, small], ["p"], [None]).masks == [None, None]
    with pytest.raises(ValueError, match=r"identity 'e': mask 1 has size \(8, 6\) but reference 1 has size \(4, 4\)"):
        IdentityRecord("e", [image, small], ["p"], [None, mask])
    with pytest.raises(ValueError, match=r"identity 'f': mask 0 has size \(8, 6\) but reference 0 has size \(4, 4\)"):
        IdentityRecord("f", small, ["p"], mask)
    with pytest.raises(ValueError, match="identity 'g': 3 masks for 2 references"):
        IdentityRecord("g", [image, image], ["p"], [mask, mask, mask])
    with pytest.raises(ValueError, match="identity 'h': needs at least one reference"):
        IdentityRecord("h", [], ["p"])
    with pytest.raises(ValueError, match="identity 'i': precomputed conditioning must be a dict"):
        IdentityRecord("i", image, ["p"], conditioning=[1, 2])
    with pytest.raises(AttributeError):
        one.reference = small  # read-only: the references list is the truth


def test_a_single_reference_sample_has_exactly_the_entries_and_json_order_it_always_had():
    (record,) = synthetic_records(1, size=16)
    sample = record.to_sample()
    assert list(sample) == ["__key__", "ref.png", "json", "mask.png"]
    assert list(json.loads(sample["json"])) == [
        "id",
        "prompts",
        "source",
        "kind",
        "colours",
        "texture",
        "category",
        "license",
    ]
    assert list(replace(record, masks=None).to_sample()) == ["__key__", "ref.png", "json"]


@pytest.mark.parametrize("k", [2, 3])
def test_several_references_round_trip_through_a_sample_pixel_for_pixel(k):
    (record,) = synthetic_records(1, size=24, references_per_identity=k, seed=2)
    record = replace(record, masks=[record.masks[0], None, *record.masks[2:]], category="animal")  # ref 1: no mask
    sample = record.to_sample()
    assert set(sample) == {"__key__", "ref.png", "mask.png", "json"} | {f"ref_{i}.png" for i in range(1, k)} | {
        f"mask_{i}.png" for i in range(2, k)
    }
    back = IdentityRecord.from_sample(sample)
    assert len(back.references) == len(back.masks) == k and back.masks[1] is None
    assert all(same_pixels(got, want) for got, want in zip(back.references, record.references, strict=True))
    assert all(same_pixels(got, want) for got, want in zip(back.masks, record.masks, strict=True))
    assert not same_pixels(back.references[0], back.references[1])  # distinct views, not one image repeated
    assert (back.id, back.prompts, back.category, back.source, back.extra) == (
        record.id,
        record.prompts,
        "animal",
        "synthetic",
        record.extra,
    )


def test_further_references_are_other_poses_of_the_same_subject():
    single = list(synthetic_records(3, size=32, seed=3))
    multi = list(synthetic_records(3, size=32, seed=3, references_per_identity=3))
    assert same_pixels(multi[0].reference, single[0].reference) and multi[0].prompts == single[0].prompts
    assert [r.id for r in synthetic_records(3, size=32, seed=3, references_per_identity=1)] == [r.id for r in single]
    for record in multi:
        assert len(record.references) == 3 and all(m is not None for m in record.masks)
        for image, mask in zip(record.references, record.masks):
            subject = to_mask_batch(mask)[0] > 0.5
            background = to_image_batch(image)[0][:, ~subject]
            assert subject.any() and torch.allclose(background, torch.full_like(background, 0.5), atol=1 / 255)
        assert not same_pixels(record.masks[0], record.masks[1])
    with pytest.raises(ValueError, match="references_per_identity must be >= 1"):
        next(synthetic_records(1, references_per_identity=0))


def test_the_world_separates_structure_from_identity():
    """Re-posing a subject earns nSSM and keeps VSM; recolouring it keeps the layout and loses identity."""
    subject = SubjectIdentity("star", ("red", "yellow"), "stripes")
    reference, mask = render(subject, Pose(0.5, 0.5, 0.3, 0.0))
    variants = [
        render(subject, Pose(0.35, 0.6, 0.22, 0.8)),
        render(SubjectIdentity("star", ("blue", "teal"), "stripes"), Pose(0.5, 0.5, 0.3, 0.0)),
    ]
    images = torch.stack([v[0] for v in variants])
    out = GatedReward(FeatureScorer(DenseDescriptor()))(
        reference, images, ref_mask=mask, gen_masks=torch.stack([v[1] for v in variants])
    )
    moved, recoloured = 0, 1
    nssm, vsm = out.components["nssm"], out.components["vsm"]
    assert nssm[moved] > 0.5 and vsm[moved] > 0.8 and not out.gated[moved]
    assert nssm[recoloured] < 0.1 and vsm[recoloured] < 0.2 and out.gated[recoloured]

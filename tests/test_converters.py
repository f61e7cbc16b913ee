"""`divrl data`: each converter on a small fixture of its real layout, the bad inputs, the split, and the round trip
into training."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from divrl.cli import main
from divrl.data import converters as C
from divrl.data.schema import IdentityRecord

ROOT = Path(__file__).resolve().parents[1]

TEMPLATES = """Classes

subject_name,class
dog,dog
red_can,can

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


def photo(path: Path, colour=(200, 30, 30), size=(48, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (120, 120, 120))
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
    image.save(path)
    return path


def records(out: Path, split: str = "train") -> list[IdentityRecord]:
    urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    return [IdentityRecord.from_sample(s) for s in wds.WebDataset(urls, shardshuffle=False)] if urls else []


def truncated_jpeg(path: Path) -> Path:
    photo(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


# ---------------------------------------------------------------------------------------------------- dreambooth


@pytest.fixture
def dreambooth(tmp_path) -> Path:
    src = tmp_path / "dreambooth"
    photo(src / "dog" / "00.jpg", (150, 100, 50))
    photo(src / "dog" / "01.jpg", (150, 100, 60))
    photo(src / "red_can" / "00.jpg", (220, 0, 0))
    (src / "prompts_and_classes.txt").write_text(TEMPLATES)
    return src


def test_dreambooth_instantiates_the_class_templates(dreambooth, tmp_path):
    out = tmp_path / "out"
    assert main(["data", "dreambooth", "--src", str(dreambooth), "--out", str(out), "--resolution", "32"]) == 0
    got = {r.id: r for r in records(out)}
    assert set(got) == {"dog", "red_can"}
    assert got["dog"].prompts == ["a dog in the jungle", "a dog wearing a red hat", "a dog in a chef outfit"]
    assert got["red_can"].prompts == ["a can in the jungle", "a red can"]
    assert got["dog"].category == "live" and got["red_can"].category == "object"
    assert got["dog"].reference.size == (32, 32) and got["dog"].extra["views"] == ["01.jpg"]
    assert got["dog"].reference.getpixel((16, 16)) == pytest.approx((150, 100, 50), abs=8)  # 00.jpg is the reference
    token = list(C.read_dreambooth(dreambooth, unique_token="sks"))
    assert token[0].prompts[0] == "a sks dog in the jungle"


def test_dreambooth_on_the_real_dataset(dreambooth_root, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "dreambooth",
                "--src",
                str(dreambooth_root),
                "--out",
                str(out),
                "--resolution",
                "64",
                "--val-fraction",
                "0.2",
                "--shard-size",
                "8",
            ]
        )
        == 0
    )
    train, val = records(out, "train"), records(out, "val")
    assert len(train) + len(val) == 30 and 2 <= len(val) <= 12
    assert all(len(r.prompts) == 25 for r in train + val)
    dogs = [r for r in train + val if r.extra["class"] == "dog"]
    assert dogs and all(r.category == "live" and "wearing a santa hat" in " ".join(r.prompts) for r in dogs)


# ---------------------------------------------------------------------------------------------------- dreambench


def test_dreambench_keeps_categories_and_skips_bad_captions(tmp_path):
    root = tmp_path / "dreambench_plus"
    for category, index in (("animal", "00"), ("style", "03"), ("object", "01"), ("object", "02"), ("human", "00")):
        photo(root / "data" / "images" / category / f"{index}.jpg")
    captions = root / "data" / "captions"
    captions.mkdir(parents=True)
    for category, index, text in (
        ("animal", "00", "a corgi\na corgi on the moon\na corgi in a box"),
        ("style", "03", "a watercolor\nthe city in this style"),
        ("object", "01", "a teapot\n"),
    ):
        (captions / category).mkdir(exist_ok=True)
        (captions / category / f"{index}.txt").write_text(text)
    out = tmp_path / "out"
    assert main(["data", "dreambench", "--src", str(root), "--out", str(out)]) == 0
    got = {r.id: r for r in records(out)}
    assert set(got) == {"animal/00", "style/03"}
    assert got["animal/00"].prompts == ["a corgi on the moon", "a corgi in a box"]
    assert got["animal/00"].extra["subject"] == "a corgi" and got["style/03"].category == "style"
    report = C.convert(C.read_dreambench(root), tmp_path / "again")
    reasons = {Path(s.where).parent.name + "/" + Path(s.where).stem: s.reason for s in report.skipped}
    assert "no prompts" in reasons["object/01"]  # a subject line only
    assert "is missing" in reasons["object/02"] and "is missing" in reasons["human/00"]


def dreambench_photo(root: Path, image: Image.Image, **save) -> list[IdentityRecord]:
    """One DreamBench++ identity whose photo is ``image`` (saved as PNG with ``save``), read back by the converter."""
    (root / "data" / "images" / "object").mkdir(parents=True, exist_ok=True)
    image.save(root / "data" / "images" / "object" / "00.png", **save)
    (root / "data" / "captions" / "object").mkdir(parents=True, exist_ok=True)
    (root / "data" / "captions" / "object" / "00.txt").write_text("a toy\na toy on the moon")
    return [r for r in C.read_dreambench(root) if isinstance(r, IdentityRecord)]


def test_a_16_bit_photo_keeps_its_tones(tmp_path):
    ramp = Image.fromarray((torch.arange(64).repeat(16, 1) * 1024).numpy().astype("uint16"))  # 0 .. 64512
    (record,) = dreambench_photo(tmp_path, ramp)
    grey = torch.tensor(list(record.reference.convert("L").getdata())).view(16, 64)
    expected = torch.round(torch.arange(64) * 1024 / 65535 * 255)
    assert torch.equal(
        grey[0].float(), expected
    )  # scaled by the bit depth; PIL's convert would give 255 nearly everywhere


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a phone photo stored sideways
    (record,) = dreambench_photo(tmp_path, wide, exif=exif.tobytes())
    assert record.reference.size == (20, 40)


def test_transparency_is_composited_on_white_and_becomes_the_mask(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.paste((10, 200, 10, 255), (2, 2, 6, 6))  # an opaque green subject on a transparent background
    (record,) = dreambench_photo(tmp_path, image)
    assert record.reference.getpixel((0, 0)) == C.BACKGROUND and record.reference.getpixel((3, 3)) == (10, 200, 10)
    assert record.mask is not None and record.mask.getpixel((0, 0)) == 0 and record.mask.getpixel((3, 3)) == 255
    (opaque,) = dreambench_photo(tmp_path / "opaque", Image.new("RGBA", (8, 8), (5, 5, 5, 255)))
    assert opaque.mask is None  # no transparency: no mask invented


# ---------------------------------------------------------------------------------------------------- syncd


def syncd_identity(root: Path, name: str, prompts, mask=True, corrupt=False) -> None:
    folder = root / name
    photo(folder / "0.jpg")
    photo(folder / "1.jpg")
    if corrupt:
        truncated_jpeg(folder / "0.jpg")
    if mask:
        (folder / "masks").mkdir()
        Image.new("L", (48, 32), 255).save(folder / "masks" / "0.jpg")
    (folder / "metadata.json").write_text(json.dumps({"filenames": ["0.jpg", "1.jpg"], "prompts": prompts}))


def test_syncd_release_layout_and_its_bad_items(tmp_path):
    src = tmp_path / "syncd"
    syncd_identity(src, "cat_0001", ["a cat on a sofa", "a cat in the rain"])
    syncd_identity(src, "mug_0002", ["a mug on a desk"], mask=False)
    syncd_identity(src, "lamp_0003", [], mask=True)
    syncd_identity(src, "bag_0004", ["a bag"], corrupt=True)
    out = tmp_path / "out"
    assert (
        main(
            ["data", "syncd", "--src", str(src), "--out", str(out), "--resolution", "16", "--prompts-per-identity", "1"]
        )
        == 0
    )
    (good,) = records(out)
    assert good.id == "cat_0001" and good.prompts == ["a cat on a sofa"] and good.mask is not None
    assert good.extra["views"] == ["1.jpg"]
    assert main(["data", "syncd", "--src", str(src), "--out", str(tmp_path / "strict"), "--strict"]) == 1
    assert not list((tmp_path / "strict").glob("*.tar"))  # a failed strict conversion leaves no shard behind


def test_syncd_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    ref, mask = Image.new("RGB", (24, 24), (10, 200, 10)), Image.new("L", (24, 24), 255)
    table = pa.table(
        {
            "image": [
                {"bytes": png(ref), "path": None},
                {"bytes": b"broken", "path": None},
                {"bytes": png(ref), "path": None},
            ],
            "mask": [{"bytes": png(mask), "path": None}] * 3,
            "caption": ["header\na green cube on a table\na green cube in space", "x\ny", "only one line"],
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    report = C.convert(C.read_syncd_parquet(tmp_path / "part-0.parquet"), tmp_path / "out", resolution=None)
    got = records(tmp_path / "out")
    assert [r.prompts for r in got] == [["a green cube on a table", "a green cube in space"], ["only one line"]]
    assert len(report.skipped) == 1 and "row1" in report.skipped[0].where


# ---------------------------------------------------------------------------------------------------- common


def record(identity: str, size=(40, 20)) -> IdentityRecord:
    return IdentityRecord(
        identity, Image.new("RGB", size, (255, 0, 0)), ["a prompt"], Image.new("L", size, 255), source="test"
    )


def test_duplicate_ids_are_skipped_and_the_first_kept(tmp_path):
    first, second = record("same"), record("same", size=(10, 10))
    report = C.convert([first, second, record("other")], tmp_path, resolution=None)
    assert [r.id for r in records(tmp_path)] == ["same", "other"] and records(tmp_path)[0].reference.size == (40, 20)
    assert [s.reason for s in report.skipped] == ["duplicate identity id (the first one was kept)"]
    assert "converted 2 identities" in report.summary() and "skipped 1" in report.summary()


def test_resize_policies_keep_or_change_the_aspect():
    wide = record("wide", size=(40, 20))
    padded = C.resize_record(wide, 20, "pad")
    assert padded.reference.size == (20, 20)
    assert padded.mask.getpixel((10, 2)) == 0 and padded.mask.getpixel((10, 10)) == 255  # letterboxed, aspect kept
    cropped = C.resize_record(wide, 20, "crop")
    assert cropped.mask.getpixel((10, 2)) == 255  # the centre crop fills the frame
    assert C.resize_record(wide, 20, "stretch").reference.size == (20, 20)
    with pytest.raises(ValueError, match="resize policy"):
        C.resize_record(wide, 20, "zoom")


def test_the_split_is_a_function_of_the_id_and_the_seed(tmp_path):
    ids = [f"id_{i}" for i in range(200)]
    val = {i for i in ids if C.split_of(i, 0.25, seed=0) == "val"}
    assert 30 <= len(val) <= 70
    assert val == {i for i in reversed(ids) if C.split_of(i, 0.25, seed=0) == "val"}
    assert val != {i for i in ids if C.split_of(i, 0.25, seed=1) == "val"}
    report = C.convert([record(i) for i in ids[:40]], tmp_path, resolution=None, val_fraction=0.25, shard_size=7)
    assert {r.id for r in records(tmp_path, "val")} == val & set(ids[:40])
    assert report.converted == {"train": 40 - len(val & set(ids[:40])), "val": len(val & set(ids[:40]))}


def test_an_interrupted_conversion_leaves_only_complete_shards(tmp_path):
    def items():
        for i in range(5):
            yield record(f"id_{i}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.convert(items(), tmp_path, resolution=None, shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    assert [r.id for r in records(tmp_path)] == ["id_0", "id_1", "id_2", "id_3"]


def test_unreadable_and_missing_sources_are_named(tmp_path, monkeypatch, capsys):
    assert main(["data", "dreambooth", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["data", "dreambooth", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "prompts_and_classes.txt is missing" in capsys.readouterr().err


def test_an_unreadable_subject_folder_is_skipped_and_named(dreambooth, tmp_path, monkeypatch):
    real = Path.iterdir

    def iterdir(self):
        if self.name == "red_can":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    report = C.convert(C.read_dreambooth(dreambooth), tmp_path / "out", resolution=None)
    assert report.converted["train"] == 1
    assert report.skipped[0].where.endswith("red_can") and "Permission denied" in report.skipped[0].reason


def test_truncated_image_is_skipped_with_its_file(dreambooth, tmp_path):
    truncated_jpeg(dreambooth / "red_can" / "00.jpg")
    report = C.convert(C.read_dreambooth(dreambooth), tmp_path / "out", resolution=None)
    assert report.skipped[0].where.endswith("red_can/00.jpg") and "unreadable image" in report.skipped[0].reason


def test_converted_shards_train_one_step(tmp_path):
    out = tmp_path / "shards"
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "6", "--resolution", "64"]) == 0
    assert len(records(out)) == 6
    overrides = tmp_path / "over.yaml"
    overrides.write_text(
        json.dumps(
            {
                "trainer": {
                    "callbacks": [STAGES],
                    "logger": False,
                    "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "run"),
                }
            }
        )
    )
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--config",
            str(overrides),
            "--model.policy.model",
            str(ROOT / "data/demo/tiny-kontext"),
            "--trainer.max_steps",
            "1",
            "--data.shards",
            str(out),
            "--data.val_shards",
            "null",
            "--trainer.limit_val_batches",
            "0",
        ]
    )
    assert code == 0


def multi(identity: str) -> IdentityRecord:
    """Three references of different sizes and colours; the second has no mask."""
    sizes, colours = ((40, 20), (30, 30), (20, 40)), ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    references = [Image.new("RGB", s, c) for s, c in zip(sizes, colours)]
    masks = [Image.new("L", (40, 20), 255), None, Image.new("L", (20, 40), 255)]
    return IdentityRecord(identity, references, ["a prompt", "another"], masks, category="object")


def test_every_reference_and_its_mask_is_resized():
    record = C.resize_record(multi("three"), 20, "pad")
    assert [r.size for r in record.references] == [(20, 20)] * 3 and record.masks[1] is None
    assert [r.getpixel((10, 10)) for r in record.references] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert record.masks[0].getpixel((10, 2)) == 0 and record.masks[2].getpixel((2, 10)) == 0  # each padded its way
    assert (record.id, record.prompts, record.category) == ("three", ["a prompt", "another"], "object")


class FakePolicy:
    """Stands for a model family: its payload is its own business (here: what it saw of the record)."""

    def precompute(self, record: IdentityRecord, resolution: int) -> dict:
        return {
            "model": "fake",
            "resolution": resolution,
            "sizes": [list(r.size) for r in record.references],
            "rows": torch.arange(len(record.prompts)),
        }


def test_several_references_and_the_policys_payload_survive_a_conversion(tmp_path):
    precompute = C.Precompute(FakePolicy(), 16)
    report = C.convert([multi("three"), record("one")], tmp_path, resolution=16, precompute=precompute)
    assert report.converted["train"] == 2
    got = {r.id: r for r in records(tmp_path)}
    three = got["three"]
    assert len(three.references) == 3 and [m is None for m in three.masks] == [False, True, False]
    assert [r.getpixel((8, 8)) for r in three.references] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert three.conditioning["sizes"] == [[16, 16]] * 3  # computed after resizing, on what the shard stores
    assert three.conditioning["model"] == "fake" and torch.equal(three.conditioning["rows"], torch.arange(2))
    assert len(got["one"].references) == 1 and got["one"].conditioning["sizes"] == [[16, 16]]


def test_a_policy_payload_that_is_not_a_dict_is_refused():
    class Bad:
        def precompute(self, record, resolution):
            return [1, 2]

    with pytest.raises(TypeError, match=r"Bad.precompute returned a list for identity 'one'; it must return a dict"):
        C.Precompute(Bad(), 16)(record("one"))


# ---------------------------------------------------------------------------------------------------- precompute

DEMO_MODEL = str(ROOT / "data/demo/tiny-kontext")


def convert_synthetic(out: Path, *extra: str) -> None:
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "6", "--resolution", "64", *extra]) == 0


def test_precomputed_conditioning_equals_what_the_policy_computes(tmp_path):
    from divrl.policy import KontextPolicy

    convert_synthetic(
        tmp_path, "--precompute", DEMO_MODEL, "--precompute-resolution", "32", "--max-sequence-length", "32"
    )
    (first, *_) = records(tmp_path)
    cond = first.conditioning
    assert cond["model"] == DEMO_MODEL and cond["resolution"] == 32 and cond["max_sequence_length"] == 32
    assert cond["prompt_embeds"].shape[:2] == (len(first.prompts), 32)
    policy = KontextPolicy.from_pretrained(DEMO_MODEL, lora=None, max_sequence_length=32)
    live = policy.condition([first.reference] * 2, first.prompts[:2], 32, 32, group_size=3)
    stored = policy.condition_from_precomputed(
        cond["prompt_embeds"][:2],
        cond["pooled_prompt_embeds"][:2],
        cond["image_latents"].expand(2, -1, -1),
        32,
        32,
        group_size=3,
    )
    for name in ("prompt_embeds", "pooled_prompt_embeds", "image_latents", "img_ids", "text_ids", "guidance"):
        assert torch.equal(getattr(live, name), getattr(stored, name)), name
    # through the seam: a condition carrying its identity's payload encodes to what the encoders compute
    from divrl.data.stream import to_condition

    with_payload = to_condition(first, 1)
    without = dataclasses.replace(with_payload, conditioning=None)
    a, b = policy.encode([with_payload], 32, 32, group_size=2), policy.encode([without], 32, 32, group_size=2)
    for name in ("prompt_embeds", "pooled_prompt_embeds", "image_latents", "img_ids", "text_ids", "guidance"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    with pytest.raises(ValueError, match=r"has 4 prompt rows, the prompt drawn is number 9"):
        policy.encode([dataclasses.replace(with_payload, prompt_index=9)], 32, 32)
    with pytest.raises(ValueError, match=r"computed for other prompts .*edited after --precompute"):  # a stale payload
        policy.encode([dataclasses.replace(with_payload, prompt="a prompt written later")], 32, 32)


STAGES = {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": 60}}
"""The demo's stage switch: a config's trainer.callbacks replaces the demo's list, and its two rewards need it."""


def fit_on(shards: Path, root: Path, *extra: str) -> dict:
    overrides = root / "over.yaml"
    root.mkdir(parents=True, exist_ok=True)
    overrides.write_text(
        json.dumps(
            {
                "trainer": {
                    "callbacks": [STAGES, {"class_path": "divrl.training.LoRAExporter"}],
                    "logger": False,
                    "enable_checkpointing": False,
                    "default_root_dir": str(root),
                    "enable_progress_bar": False,
                }
            }
        )
    )
    assert (
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/demo.yaml"),
                "--config",
                str(overrides),
                "--model.policy.model",
                DEMO_MODEL,
                "--trainer.max_steps",
                "2",
                "--data.shards",
                str(shards),
                "--data.val_shards",
                "null",
                "--trainer.limit_val_batches",
                "0",
                *extra,
            ]
        )
        == 0
    )
    from safetensors.torch import load_file

    return load_file(root / "lora/final/pytorch_lora_weights.safetensors")


def test_training_on_precomputed_shards_without_text_encoders_matches_encoding_at_run_time(tmp_path):
    plain, pre = tmp_path / "plain", tmp_path / "pre"
    convert_synthetic(plain)
    convert_synthetic(pre, "--precompute", DEMO_MODEL, "--precompute-resolution", "32", "--max-sequence-length", "32")
    encoded = fit_on(plain, tmp_path / "run_plain")
    stored = fit_on(pre, tmp_path / "run_pre", "--model.policy.text_encoders", "false")
    assert set(encoded) == set(stored)
    assert all(torch.allclose(encoded[k], stored[k], atol=1e-6) for k in encoded)
    assert any(v.abs().max() > 0 for k, v in stored.items() if "lora_B" in k)  # it trained


def test_missing_or_mismatched_precomputed_conditioning_fails_clearly(tmp_path):
    plain, pre = tmp_path / "plain", tmp_path / "pre"
    convert_synthetic(plain)
    with pytest.raises(RuntimeError, match="divrl data ... --precompute"):
        fit_on(plain, tmp_path / "a", "--model.policy.text_encoders", "false")
    convert_synthetic(pre, "--precompute", DEMO_MODEL, "--precompute-resolution", "48", "--max-sequence-length", "32")
    with pytest.raises(ValueError, match=r"'resolution': 48.*needs \{'resolution': 32"):
        fit_on(pre, tmp_path / "b", "--model.policy.text_encoders", "false")


def test_a_policy_without_encoders_holds_no_text_encoder_or_vae_encoder_weights():
    from divrl.policy import KontextConfig

    full = KontextConfig(model=DEMO_MODEL, lora=None, max_sequence_length=32).build()
    lean = KontextConfig(model=DEMO_MODEL, lora=None, max_sequence_length=32, text_encoders=False).build()
    assert lean.text_encoder is None and lean.text_encoder_2 is None and lean.vae.encoder is None
    dropped = sum(p.numel() for m in (full.text_encoder, full.text_encoder_2, full.vae.encoder) for p in m.parameters())
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in lean.parameters()) == dropped
    with pytest.raises(RuntimeError, match="--precompute"):
        lean.encode_reference(Image.new("RGB", (32, 32)), 32, 32)


# ---------------------------------------------------------------------------------------------------- targets


def rgb_bytes(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def samples(out: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))


def test_dreambooth_targets_cycle_over_the_other_photos(dreambooth, tmp_path):
    photo(dreambooth / "dog" / "02.jpg", (10, 200, 10), size=(20, 12))  # dog: 3 photos, 3 live-subject prompts
    report = C.convert(C.read_dreambooth(dreambooth, targets=True), tmp_path / "out", resolution=None)
    assert report.skipped == []
    got = {r.id: r for r in records(tmp_path / "out")}
    dog = got["dog"]
    assert sorted(dog.targets) == [0, 1, 2]
    expected = {0: "01.jpg", 1: "02.jpg", 2: "01.jpg"}  # photos[1 + p % 2]
    for p, name in expected.items():
        assert dog.targets[p].tobytes() == rgb_bytes(dreambooth / "dog" / name), p
    assert dog.targets[1].size == (20, 12) and dog.targets[0].size == (48, 32)  # not resized with resolution=None
    assert dog.reference.tobytes() == rgb_bytes(dreambooth / "dog" / "00.jpg")
    assert dog.extra["views"] == ["01.jpg", "02.jpg"]
    assert got["red_can"].targets == {}  # a single photo: converted, without targets
    assert len(got["red_can"].prompts) == 2


def test_an_unreadable_dreambooth_target_is_skipped_alone(dreambooth, tmp_path):
    truncated_jpeg(dreambooth / "dog" / "02.jpg")
    report = C.convert(C.read_dreambooth(dreambooth, targets=True), tmp_path / "out", resolution=None)
    assert report.converted["train"] == 2 and len(report.skipped) == 1
    (skip,) = report.skipped
    assert skip.where.endswith("dog/02.jpg") and "unreadable image" in skip.reason and "prompt(s) 1 " in skip.reason
    dog = {r.id: r for r in records(tmp_path / "out")}["dog"]
    assert sorted(dog.targets) == [0, 2]
    assert dog.targets[2].tobytes() == rgb_bytes(dreambooth / "dog" / "01.jpg")


def test_the_cli_writes_dreambooth_targets_only_when_asked(dreambooth, tmp_path):
    out, plain = tmp_path / "out", tmp_path / "plain"
    assert (
        main(["data", "dreambooth", "--src", str(dreambooth), "--out", str(out), "--resolution", "0", "--targets"]) == 0
    )
    raw = {s["__key__"]: s for s in samples(out)}
    assert sorted(k for k in raw["dog"] if k.startswith("target_")) == ["target_0.png", "target_1.png", "target_2.png"]
    assert not any(k.startswith("target_") for k in raw["red_can"])
    dog = IdentityRecord.from_sample(raw["dog"])
    assert all(dog.targets[p].tobytes() == rgb_bytes(dreambooth / "dog" / "01.jpg") for p in range(3))
    assert main(["data", "dreambooth", "--src", str(dreambooth), "--out", str(plain), "--resolution", "0"]) == 0
    assert len(samples(plain)) == 2 and not any(k.startswith("target_") for s in samples(plain) for k in s)
    resized = tmp_path / "resized"  # targets follow the references' resize policy
    assert (
        main(["data", "dreambooth", "--src", str(dreambooth), "--out", str(resized), "--resolution", "16", "--targets"])
        == 0
    )
    dog = {r.id: r for r in records(resized)}["dog"]
    assert dog.reference.size == (16, 16) and {t.size for t in dog.targets.values()} == {(16, 16)}
    assert dog.targets[0].getpixel((8, 8)) == pytest.approx((150, 100, 60), abs=8)  # 01.jpg's centre colour


def syncd_views(root: Path, name: str, views: int, prompts: list[str]) -> list[Path]:
    """A SynCD identity folder with ``views`` images of distinct colours (0 the reference) and its metadata."""
    folder = root / name
    paths = [photo(folder / f"{i}.png", (40 * i, 255 - 40 * i, 7 * i), size=(12 + 2 * i, 10)) for i in range(views)]
    (folder / "masks").mkdir()
    Image.new("L", (12, 10), 255).save(folder / "masks" / "0.jpg")
    (folder / "metadata.json").write_text(json.dumps({"filenames": [p.name for p in paths], "prompts": prompts}))
    return paths


def syncd_targets(src: Path, per: int | None = None) -> dict[str, dict[int, bytes]]:
    items = list(C.read_syncd(src, per, targets=True))
    assert not [i for i in items if isinstance(i, C.Skip)]
    return {r.id: {p: image.tobytes() for p, image in r.targets.items()} for r in items}


def test_syncd_targets_aligned_cycling_and_truncated(tmp_path):
    src = tmp_path / "syncd"
    aligned = syncd_views(src, "aligned", 3, ["p0", "p1", "p2"])
    cycling = syncd_views(src, "cycling", 3, ["q0", "q1", "q2", "q3", "q4"])
    blank = syncd_views(src, "blank", 3, ["r0", " ", "r2"])  # aligned on the JSON's list: r2 keeps image 2
    syncd_views(src, "single", 1, ["s0", "s1"])
    got = syncd_targets(src)
    want = [rgb_bytes(p) for p in aligned]
    assert got["aligned"] == {1: want[1], 2: want[2]}  # image i from prompt i; prompt 0 is the reference's
    want = [rgb_bytes(p) for p in cycling]
    assert got["cycling"] == {0: want[1], 1: want[2], 2: want[1], 3: want[2], 4: want[1]}
    assert got["blank"] == {1: rgb_bytes(blank[2])}
    assert got["single"] == {}
    truncated = syncd_targets(src, per=2)
    assert truncated["aligned"] == {1: rgb_bytes(aligned[1])}
    assert truncated["cycling"] == {0: rgb_bytes(cycling[1]), 1: rgb_bytes(cycling[2])}
    assert all(len(r.prompts) <= 2 and set(r.targets) <= {0, 1} for r in C.read_syncd(src, 2, targets=True))
    assert all(r.targets == {} for r in C.read_syncd(src))  # off by default
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "syncd",
                "--src",
                str(src),
                "--out",
                str(out),
                "--resolution",
                "0",
                "--targets",
                "--prompts-per-identity",
                "2",
            ]
        )
        == 0
    )
    back = {r.id: r for r in records(out)}
    assert {k: {p: t.tobytes() for p, t in r.targets.items()} for k, r in back.items()} == truncated


def test_targets_are_refused_for_sources_without_them(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "parquet").mkdir()
    (tmp_path / "parquet" / "part-0.parquet").write_bytes(b"not read")
    for argv in (
        ["dreambench", "--src", str(tmp_path / "bench")],
        ["psrbench", "--src", str(tmp_path / "bench")],
        ["syncd", "--src", str(tmp_path / "parquet")],
        ["syncd", "--src", str(tmp_path / "parquet" / "part-0.parquet")],
    ):
        assert main(["data", *argv, "--targets", "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert "--targets applies only to other sources" in err and "nothing was written" in err
        assert not (tmp_path / "refused").exists()
    assert main(["data", "synthetic", "--subjects", "2", "--targets", "--out", str(tmp_path / "refused")]) == 2
    assert "--targets" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="--targets"):
        C.read_synthetic(2, 0, None, subjects=(2,), targets=True)


def test_synthetic_targets_through_the_cli_equal_the_worlds(tmp_path):
    from divrl.data.synthetic import synthetic_records

    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "synthetic",
                "--out",
                str(out),
                "--num-identities",
                "2",
                "--resolution",
                "0",
                "--targets",
                "--seed",
                "4",
                "--prompts-per-identity",
                "2",
            ]
        )
        == 0
    )
    got = records(out)
    expected = list(synthetic_records(2, size=128, prompts_per_identity=2, seed=4, targets=True))
    assert [r.id for r in got] == [r.id for r in expected] and len(got) == 2
    for mine, theirs in zip(got, expected):
        assert mine.prompts == theirs.prompts and sorted(mine.targets) == sorted(theirs.targets) == [0, 1]
        assert all(mine.targets[p].tobytes() == theirs.targets[p].convert("RGB").tobytes() for p in mine.targets)


def test_targets_are_resized_with_the_references():
    wide = dataclasses.replace(record("wide", size=(40, 20)), targets={0: Image.new("RGB", (10, 30), (0, 0, 255))})
    padded = C.resize_record(wide, 20, "pad")
    assert padded.targets[0].size == (20, 20) and padded.targets[0].getpixel((10, 10)) == (0, 0, 255)
    assert padded.targets[0].getpixel((1, 10)) == (0, 0, 255)  # padded with its own border colour
    assert C.resize_record(wide, None, "pad").targets[0].size == (10, 30)

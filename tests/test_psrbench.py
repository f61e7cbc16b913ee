"""`divrl data psrbench`: PSRBench's layout (``<Subset>.json`` lists of samples with ``instruction``, ``input_path``
and ``category1..N``, images under ``subjects/`` and ``animals/``) read into multi-subject identity shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from divrl.cli import main
from divrl.data import converters as C
from divrl.data.schema import IdentityRecord


def photo(path: Path, colour=(200, 30, 30), size=(24, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.as_posix()


def cutout(path: Path) -> None:
    """An RGBA product shot: an opaque green square on a transparent background."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.paste((10, 200, 10, 255), (2, 2, 6, 6))
    image.save(path)


def records(out: Path, split: str) -> dict[str, IdentityRecord]:
    urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    samples = wds.WebDataset(urls, shardshuffle=False) if urls else []
    return {r.id: r for r in (IdentityRecord.from_sample(s) for s in samples)}


def sample(prompt: str, paths: list[str], *words: str, **more) -> dict:
    return {"instruction": prompt, "input_path": paths, **{f"category{k + 1}": w for k, w in enumerate(words)}, **more}


@pytest.fixture
def bench(tmp_path) -> Path:
    src = tmp_path / "PSRBench"
    photo(src / "animals" / "dog.jpg", (150, 100, 50))
    photo(src / "animals" / "cat.jpg", (90, 90, 90))
    photo(src / "subjects" / "backpack.jpg", (20, 20, 160))
    photo(src / "subjects" / "teapot.jpg", (220, 220, 0))
    cutout(src / "subjects" / "sneaker.png")
    (src / "subjects" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (src / "Attribute.json").write_text(
        json.dumps(
            [
                sample(
                    "a dog wearing a red scarf beside a sneaker",
                    ["animals/dog.jpg", "subjects/sneaker.png"],
                    "dog",
                    "shoe",
                    attribute="red scarf",
                ),
                sample("a cat and a backpack", ["animals/cat.jpg", "subjects/nowhere.jpg"], "cat", "backpack"),
                sample("  ", ["animals/cat.jpg", "subjects/backpack.jpg"], "cat", "backpack"),
            ]
        )
    )
    (src / "Position.json").write_text(
        json.dumps(
            [
                sample(
                    "a backpack to the left of a dog", ["subjects/backpack.jpg", "animals/dog.jpg"], "backpack", "dog"
                ),
                sample("a cat under a teapot", ["animals/cat.jpg", "subjects/teapot.jpg"], "cat"),
            ]
        )
    )
    (src / "Three.json").write_text(
        json.dumps(
            [
                sample(
                    "a dog, a cat and a teapot in a garden",
                    ["animals/dog.jpg", "animals/cat.jpg", "subjects/teapot.jpg"],
                    "dog",
                    "cat",
                    "teapot",
                ),
                sample(
                    "a dog, a cat and a teapot",
                    ["animals/dog.jpg", "animals/cat.jpg", "subjects/broken.jpg"],
                    "dog",
                    "cat",
                    "teapot",
                ),
            ]
        )
    )
    return src


def test_psrbench_samples_become_multi_subject_identities_in_val(bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "psrbench", "--src", str(bench), "--out", str(out), "--resolution", "0"]) == 0
    summary = capsys.readouterr().out
    assert not list(out.glob("train-*.tar"))  # an evaluation benchmark: everything in val by default
    got = records(out, "val")
    assert sorted(got) == ["attribute/000", "position/000", "three/000"]

    attribute = got["attribute/000"]
    assert attribute.prompts == ["a dog wearing a red scarf beside a sneaker"] and attribute.source == "psrbench"
    assert attribute.category == "attribute" and len(attribute.references) == 2
    assert attribute.extra["subjects"] == ["dog", "shoe"] and attribute.extra["subset"] == "Attribute"
    assert attribute.extra["reference_paths"] == ["animals/dog.jpg", "subjects/sneaker.png"]
    assert attribute.extra["fields"] == {"attribute": "red scarf"} and attribute.extra["index"] == 0
    assert attribute.references[0].getpixel((4, 4)) == pytest.approx((150, 100, 50), abs=4)  # input_path order
    shoe, shoe_mask = attribute.references[1], attribute.masks[1]
    assert attribute.masks[0] is None  # an opaque JPEG: no mask invented
    assert shoe.getpixel((0, 0)) == C.BACKGROUND and shoe.getpixel((3, 3)) == (10, 200, 10)
    assert shoe_mask.size == shoe.size and shoe_mask.getpixel((0, 0)) == 0 and shoe_mask.getpixel((3, 3)) == 255

    position = got["position/000"]
    assert position.extra["subjects"] == ["backpack", "dog"] and position.extra["relation"] == "to the left of"
    three = got["three/000"]
    assert len(three.references) == 3 and three.extra["subjects"] == ["dog", "cat", "teapot"]
    assert three.masks == [None, None, None] and "relation" not in three.extra

    assert "converted 3 identities (train 0, val 3)" in summary and "skipped 4" in summary
    skipped = {
        line.split(": ", 1)[0].removeprefix("  skipped "): line.split(": ", 1)[1]
        for line in summary.splitlines()
        if line.startswith("  skipped ")
    }
    assert set(skipped) == {
        str(bench / name) for name in ("Attribute.json#1", "Attribute.json#2", "Position.json#1", "Three.json#1")
    }
    assert "subjects/nowhere.jpg is missing" in skipped[str(bench / "Attribute.json#1")]
    assert "no prompt" in skipped[str(bench / "Attribute.json#2")]
    assert "1 category word(s) for 2 reference image(s)" in skipped[str(bench / "Position.json#1")]
    assert "subjects/broken.jpg" in skipped[str(bench / "Three.json#1")]
    assert "unreadable image" in skipped[str(bench / "Three.json#1")]


def test_psrbench_subsets_split_and_strict(bench, tmp_path):
    out = tmp_path / "some"
    assert (
        main(
            [
                "data",
                "psrbench",
                "--src",
                str(bench),
                "--out",
                str(out),
                "--resolution",
                "16",
                "--subsets",
                "three, attribute",
                "--val-fraction",
                "0",
            ]
        )
        == 0
    )
    assert not list(out.glob("val-*.tar"))  # an explicit --val-fraction wins
    got = records(out, "train")
    assert sorted(got) == ["attribute/000", "three/000"]
    assert all(image.size == (16, 16) for r in got.values() for image in r.references)
    assert got["attribute/000"].masks[1].size == (16, 16)  # the mask is resized with its reference
    assert main(["data", "psrbench", "--src", str(bench), "--out", str(tmp_path / "strict"), "--strict"]) == 1
    assert not list((tmp_path / "strict").glob("*.tar"))


def test_psrbench_bad_files_are_named(bench, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "psrbench", "--src", str(empty), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "Attribute.json" in err and "Four.json" in err

    assert main(["data", "psrbench", "--src", str(bench), "--out", str(tmp_path / "o2"), "--subsets", "Four"]) == 2
    assert "Four.json" in capsys.readouterr().err
    assert main(["data", "psrbench", "--src", str(bench), "--out", str(tmp_path / "o3"), "--subsets", "Colour"]) == 2
    assert "Colour" in capsys.readouterr().err

    (bench / "Complex.json").write_text('[{"instruction": "a dog and a cat",]')
    assert main(["data", "psrbench", "--src", str(bench), "--out", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err
    assert "Complex.json is not valid JSON" in err and "line 1" in err
    assert not list((tmp_path / "o4").glob("*.tar"))  # every file is parsed before a shard is written

    (bench / "Complex.json").write_bytes(
        json.dumps([sample("un caf\u00e9", [], "dog")]).encode("utf-8").replace(b"\\u00e9", b"\xe9")
    )
    assert main(["data", "psrbench", "--src", str(bench), "--out", str(tmp_path / "o5")]) == 2
    assert "Complex.json: line 1 is not UTF-8" in capsys.readouterr().err

    (bench / "Complex.json").write_text(json.dumps({"instruction": "a dog"}))
    with pytest.raises(ValueError, match="Complex.json holds a JSON dict"):
        list(C.read_psrbench(bench))


def test_psrbench_is_a_listed_source():
    assert "psrbench" in C.SOURCES and "read_psrbench" in C.__all__
    assert C.PSRBENCH_SUBSETS == ("Attribute", "Action", "Background", "Position", "Complex", "Three", "Four")

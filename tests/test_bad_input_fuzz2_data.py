"""Bad input a second fuzz of `divrl data`, `divrl sample` and `divrl score` found: a failing `--overwrite --strict`
conversion deleted the old shards, SynCD metadata whose `prompts` is a string became one prompt per letter, 16-bit,
transparent and EXIF-rotated references were read one way by `divrl data` and another by `sample`/`score`, 1x1 images
and `--size 1` scored silently, `--json dir/` wrote a file named `dir`, and a LoRA folder's parent or a checkpoints
folder was answered with a file name that does not exist. Each is fixed, or refused with one sentence naming the
input and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divrl.cli import main
from divrl.data import converters as C
from divrl.data.schema import IdentityRecord
from divrl.images import MIN_SIDE, open_image, to_image_batch, to_mask_batch

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")


def one_sentence(code, printed, command: str) -> str:
    assert code == 1 and "Traceback" not in printed.err and "usage:" not in printed.err, printed.err[-2000:]
    return next(line for line in printed.err.splitlines() if line.startswith(f"divrl {command}: "))


def sample(*more: str) -> list[str]:
    return [
        "sample",
        "--config",
        DEMO,
        "--trainer.logger",
        "false",
        "--num_steps",
        "1",
        "--num_samples",
        "1",
        "--num_identities",
        "1",
        *more,
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes, and every folder."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def square(path: Path, colour=(200, 30, 30), size: int = 32) -> Path:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    image.paste(Image.new("RGB", (size // 2, size // 2), colour), (size // 4, size // 4))
    image.save(path)
    return path


# 1. --overwrite --strict with a skipped item left no shard at all -----------------------------------------------------


@pytest.fixture
def old_shards(tmp_path) -> Path:
    out = tmp_path / "shards"
    assert main(["data", "synthetic", "--num-identities", "3", "--resolution", "16", "--out", str(out)]) == 0
    return out


@pytest.fixture
def half_bad_dreambooth(tmp_path) -> Path:
    """A DreamBooth folder with one readable subject and one whose photo is not an image."""
    src = tmp_path / "dreambooth"
    (src / "dog").mkdir(parents=True)
    square(src / "dog" / "00.png")
    (src / "can").mkdir()
    (src / "can" / "00.png").write_bytes(b"not an image")
    (src / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ndog,dog\ncan,can\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} on the beach'.format(unique_token, class_token)\n]\n"
    )
    return src


def test_a_failing_strict_overwrite_leaves_the_old_shards_exactly(old_shards, half_bad_dreambooth, capsys):
    before = snapshot(old_shards)
    assert (
        main(
            [
                "data",
                "dreambooth",
                "--src",
                str(half_bad_dreambooth),
                "--out",
                str(old_shards),
                "--resolution",
                "16",
                "--overwrite",
                "--strict",
            ]
        )
        == 1
    )
    assert snapshot(old_shards) == before  # same files, same bytes, no hidden folder left
    assert f"--out {old_shards} was left as it was (1 old shard(s))" in capsys.readouterr().err
    # without --strict the same conversion replaces them (the skip is reported, the good subject kept)
    assert (
        main(
            [
                "data",
                "dreambooth",
                "--src",
                str(half_bad_dreambooth),
                "--out",
                str(old_shards),
                "--resolution",
                "16",
                "--overwrite",
            ]
        )
        == 0
    )
    assert snapshot(old_shards) != before and [p.name for p in old_shards.iterdir()] == ["train-000000.tar"]


def test_an_overwrite_stopped_by_any_other_error_leaves_the_old_shards(old_shards, half_bad_dreambooth, monkeypatch):
    before = snapshot(old_shards)
    convert = C.convert

    def fails_midway(items, out_dir, **kwargs):  # a --precompute model that raises, a Ctrl-C, after a shard is written
        convert(items, out_dir, **kwargs)
        raise RuntimeError("the model failed")

    monkeypatch.setattr(C, "convert", fails_midway)
    with pytest.raises(RuntimeError, match="the model failed"):
        main(["data", "dreambooth", "--src", str(half_bad_dreambooth), "--out", str(old_shards), "--overwrite"])
    assert snapshot(old_shards) == before


# 2. SynCD metadata whose lists are strings -----------------------------------------------------------------------------


def syncd(root: Path, name: str, meta: dict) -> Path:
    folder = root / name
    (folder / "masks").mkdir(parents=True)
    square(folder / "00.jpg")
    square(folder / "01.jpg")
    Image.new("L", (32, 32), 255).save(folder / "masks" / "00.jpg")
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder / "metadata.json"


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        ({"filenames": ["00.jpg", "01.jpg"], "prompts": "a cat on the beach"}, "'prompts' is a JSON string"),
        ({"filenames": "00.jpg", "prompts": ["a cat on the beach"]}, "'filenames' is a JSON string"),
        ({"filenames": ["00.jpg"], "prompts": {"0": "a cat"}}, "'prompts' is a JSON object"),
        ({"filenames": ["00.jpg"], "prompts": ["a cat", None]}, "'prompts' holds a non-string entry None"),
        ({"filenames": [0], "prompts": ["a cat"]}, "'filenames' holds a non-string entry 0"),
    ],
)
def test_syncd_metadata_lists_that_are_not_lists_of_strings_are_skipped_and_named(tmp_path, capsys, meta, says):
    src = tmp_path / "syncd"
    syncd(src, "good", {"filenames": ["00.jpg", "01.jpg"], "prompts": ["a cat on a sofa", "a cat in the rain"]})
    bad = syncd(src, "bad", meta)
    items = list(C.read_syncd(src))
    skips = [item for item in items if isinstance(item, C.Skip)]
    assert [r.id for r in items if isinstance(r, IdentityRecord)] == ["good"]
    assert [s.where for s in skips] == [str(bad)] and says in skips[0].reason, skips
    assert "must be JSON lists of strings" in skips[0].reason
    assert main(["data", "syncd", "--src", str(src), "--out", str(tmp_path / "out"), "--resolution", "16"]) == 0
    assert f"skipped {bad}: {says}" in capsys.readouterr().out


def test_syncd_string_prompts_never_become_one_prompt_per_letter(tmp_path, capsys):
    src = tmp_path / "syncd"
    syncd(src, "id1", {"filenames": ["00.jpg", "01.jpg"], "prompts": "a cat on the beach"})
    assert main(["data", "syncd", "--src", str(src), "--out", str(tmp_path / "out"), "--resolution", "16"]) == 1
    assert "nothing was converted" in capsys.readouterr().err and not list((tmp_path / "out").glob("*.tar"))


# 3. sample and score read references as divrl data does ----------------------------------------------------------------


def ramp16(path: Path) -> Path:
    """A 16-bit greyscale ramp, 64x16 (PIL's convert clips it to white)."""
    Image.fromarray((torch.arange(64).repeat(16, 1) * 1024).numpy().astype("uint16")).save(path)
    return path


def rotated(path: Path) -> Path:
    """A 40x20 photo stored sideways with an EXIF orientation (6: rotate 90 degrees to display)."""
    wide = Image.new("RGB", (40, 20), (200, 30, 30))
    wide.paste((10, 10, 200), (0, 0, 10, 20))  # a blue band on the left: where it goes shows the rotation
    exif = wide.getexif()
    exif[0x0112] = 6
    wide.save(path, exif=exif.tobytes())
    return path


def transparent(path: Path) -> Path:
    """An opaque green subject on a transparent background, 32x32 (flattened on black by PIL's convert)."""
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    image.paste((10, 200, 10, 255), (8, 8, 24, 24))
    image.save(path)
    return path


def data_reference(path: Path, root: Path) -> Image.Image:
    """The reference ``divrl data dreambench`` converts from the photo at ``path`` (no resizing)."""
    folder = root / "data" / "images" / "object"
    folder.mkdir(parents=True)
    (folder / f"00{path.suffix}").write_bytes(path.read_bytes())
    (root / "data" / "captions" / "object").mkdir(parents=True)
    (root / "data" / "captions" / "object" / "00.txt").write_text("a toy\na toy on the moon")
    (record,) = [r for r in C.read_dreambench(root) if isinstance(r, IdentityRecord)]
    return record.reference


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("make", [ramp16, rotated, transparent])
def test_sample_and_score_read_a_reference_as_divrl_data_does(tmp_path, make):
    from divrl.training.inputs import conditions

    path = make(tmp_path / "photo.png")
    expected = pixels(data_reference(path, tmp_path / "dreambench"))
    (condition,) = conditions(None, [str(path)], ["a toy"], None, 1)  # divrl sample --reference
    assert torch.equal(pixels(condition.references[0]), expected)
    scored = (to_image_batch(path, "--reference")[0] * 255).round().to(torch.uint8)  # divrl score
    assert torch.equal(scored, expected)
    assert torch.equal(pixels(open_image(path, "--reference", "RGB")), expected)


def test_a_16_bit_mask_is_scaled_as_divrl_data_scales_it(tmp_path):
    from divrl.training.inputs import conditions

    path = ramp16(tmp_path / "mask16.png")
    expected = C._open_image(path, "L", str(path))  # how divrl data reads a SynCD mask
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32)) / 255
    assert torch.equal(to_mask_batch(path, "--ref-mask")[0], expected)  # divrl score --ref-mask
    reference = tmp_path / "ref.png"
    Image.new("RGB", (64, 16), (200, 30, 30)).save(reference)
    (condition,) = conditions(None, [str(reference)], ["a toy"], [str(path)], 1)  # divrl sample --mask
    got = torch.from_numpy(np.asarray(condition.masks[0], dtype=np.float32)) / 255
    assert torch.equal(got, expected)


def test_score_scores_a_16_bit_reference_as_its_8_bit_conversion(tmp_path, console):
    path = ramp16(tmp_path / "ref16.png")
    data_reference(path, tmp_path / "dreambench").save(eight := tmp_path / "ref8.png")
    scores = tmp_path / "scores.json"
    code, printed = console(
        "score", "--size", "32", "--reference", str(path), str(eight), str(path), "--json", str(scores)
    )
    assert code == 0, printed.err
    rows = json.loads(scores.read_text())["scores"]
    assert rows[0] == {**rows[1], "image": "ref8.png"}  # the same image to every backbone, whichever file holds it
    assert rows[0]["vsm"] == pytest.approx(1.0)


# 4. images too small to score or to follow -----------------------------------------------------------------------------


def test_score_refuses_images_and_sizes_below_the_minimum_side(tmp_path, console):
    ref, good = square(tmp_path / "ref.png"), square(tmp_path / "g0.png", (30, 200, 30))
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (64, MIN_SIDE - 1), (200, 30, 30)).save(thin)
    for args, says in (
        ((str(tiny), str(good)), f"--reference {tiny} is 1x1"),
        ((str(ref), str(good), str(tiny)), f"image {tiny} is 1x1"),
        ((str(ref), str(thin)), f"image {thin} is 64x{MIN_SIDE - 1}"),
    ):
        code, printed = console("score", "--size", "32", "--reference", *args)
        line = one_sentence(code, printed, "score")
        assert says in line and f"at least {MIN_SIDE}x{MIN_SIDE} pixels" in line, line
        assert "nSSM" not in printed.out  # nothing scored
    for size in ("1", str(MIN_SIDE - 1)):
        code, printed = console("score", "--size", size, "--reference", str(ref), str(good))
        assert code == 2 and f"argument --size: must be >= {MIN_SIDE}, got {size}" in printed.err
    code, printed = console("score", "--size", str(MIN_SIDE), "--reference", str(ref), str(good))
    assert code == 0, printed.err


def test_sample_refuses_a_reference_or_mask_below_the_minimum_side(tmp_path, console, no_model):
    ref, tiny = square(tmp_path / "ref.png"), tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    small_mask = tmp_path / "mask.png"
    Image.new("L", (8, 8), 255).save(small_mask)
    for more, says in (
        (("--reference", str(tiny)), f"--reference {tiny} is 1x1"),
        (("--reference", str(ref), "--mask", str(small_mask)), f"--mask {small_mask} is 8x8"),
    ):
        out = tmp_path / "out"
        code, printed = console(*sample(*more, "--prompts", "[a cat]", "--output_dir", str(out)))
        line = one_sentence(code, printed, "sample")
        assert says in line and f"at least {MIN_SIDE}x{MIN_SIDE} pixels" in line, line
        assert not out.exists()


# 5. score --json dir/ ----------------------------------------------------------------------------------------------------


def test_score_refuses_a_json_path_ending_with_a_separator(tmp_path, console):
    ref, good = square(tmp_path / "ref.png"), square(tmp_path / "g0.png", (30, 200, 30))
    folder = tmp_path / "newdir"
    code, printed = console("score", "--size", "32", "--reference", str(ref), str(good), "--json", f"{folder}/")
    assert code == 2 and f"argument --json: {folder}/ ends with a path separator; give a file name" in printed.err
    assert f"{folder}/scores.json" in printed.err and not folder.exists() and "nSSM" not in printed.out


# 6. --subject-weights with a negative first value -------------------------------------------------------------------------


def test_subject_weights_help_gives_the_form_for_values_starting_with_a_minus(tmp_path, console):
    code, printed = console("data", "--help")
    assert code == 0 and "--subject-weights=-1,2" in " ".join(printed.out.split())
    code, printed = console(
        "data", "synthetic", "--subjects", "2,3", "--subject-weights=-1,2", "--out", str(tmp_path / "out")
    )
    assert code == 2 and "--subject-weights -1,2: every weight must be a finite number >= 0" in printed.err


# 7. --lora the parent of lora/final, or a folder of checkpoints ------------------------------------------------------------


def test_load_lora_names_the_lora_folders_below_the_one_given(tmp_path):
    from divrl.policy.lora import LORA_FILE, load_adapter

    for stage in ("stage1", "final"):
        (tmp_path / "lora" / stage).mkdir(parents=True)
        (tmp_path / "lora" / stage / LORA_FILE).write_bytes(b"")
    (tmp_path / "lora" / "notes").mkdir()
    with pytest.raises(FileNotFoundError) as raised:
        load_adapter(None, tmp_path / "lora")
    assert str(raised.value) == (
        f"load_lora: {tmp_path / 'lora'} holds no {LORA_FILE} but LoRA folders below it: pass "
        f"one of {tmp_path / 'lora' / 'final'}, {tmp_path / 'lora' / 'stage1'}"
    )


def test_load_lora_names_the_checkpoints_of_a_checkpoints_folder(tmp_path):
    from divrl.policy.lora import load_adapter

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("epoch=0-step=2.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as raised:
        load_adapter(None, folder)
    assert str(raised.value) == (
        f"load_lora: {folder} is a folder of checkpoints (last.ckpt, epoch=0-step=2.ckpt): "
        f"pass one of them, e.g. {folder / 'last.ckpt'}"
    )
    with pytest.raises(FileNotFoundError, match="pass a folder written by the LoRA export"):
        load_adapter(None, tmp_path / "nothing")  # a folder holding neither: as before


def test_sample_names_the_lora_folders_below_a_runs_lora_folder(tmp_path, console):
    from divrl.policy.lora import LORA_FILE

    (tmp_path / "lora" / "final").mkdir(parents=True)
    (tmp_path / "lora" / "final" / LORA_FILE).write_bytes(b"")
    code, printed = console(*sample("--lora", str(tmp_path / "lora"), "--output_dir", str(tmp_path / "out")))
    assert f"pass one of {tmp_path / 'lora' / 'final'}" in one_sentence(code, printed, "sample")


def test_an_overwrite_interrupted_while_replacing_loses_no_shard(tmp_path, monkeypatch):
    """Ctrl-C between two shard moves of the replacement: every new shard is either in --out or still in the hidden
    folder, and no old shard was deleted before the new ones were in (the old order deleted first)."""
    out = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "synthetic",
                "--num-identities",
                "4",
                "--resolution",
                "16",
                "--shard-size",
                "1",
                "--val-fraction",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    old = sorted(p.name for p in out.glob("*.tar"))
    moves = []
    replace = Path.replace

    def interrupted(self, target):
        if Path(target).parent == out:  # a move into --out (the writer's own .partial renames stay inside)
            moves.append(self.name)
            if len(moves) == 2:
                raise KeyboardInterrupt
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "data",
                "synthetic",
                "--num-identities",
                "4",
                "--resolution",
                "16",
                "--shard-size",
                "1",
                "--val-fraction",
                "0",
                "--seed",
                "7",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
    monkeypatch.setattr(Path, "replace", replace)
    kept = {p.name for p in out.glob("*.tar")} | {p.name for p in (out / ".divrl-overwrite").glob("*.tar")}
    assert len(old) == 4 and set(old) <= kept  # the new shards share the old names: all 4 still somewhere
    assert len(list((out / ".divrl-overwrite").glob("*.tar"))) == 3  # the 3 not moved yet, kept for the user

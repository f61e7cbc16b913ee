"""Bad input a fourth fuzz of `divrl data` found: `--overwrite` deleted a user's ordinary tar named like a shard
(`val-photos.tar`), every `*.tar.partial` in --out was deleted (a user's `dreambooth.tar.partial` too), `--resolution 7`
wrote references `divrl sample` / `score` refuse, `--unique-token` was silently ignored by the sources that do not use
it, a SynCD --src that is not a Parquet file passed pyarrow's message through, and `--subject-weights -1,2` was
answered by argparse's "expected one argument". Each is fixed, or refused with one sentence naming the input and the
fix."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from divrl.cli import main
from divrl.data import converters as C
from divrl.images import MIN_SIDE

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = str(ROOT / "data/demo/tiny-kontext")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes, and every folder."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def photo_tar(path: Path, members: dict[str, bytes] | None = None) -> Path:
    """An ordinary tar (holiday photos by default), not a divrl shard."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    with tarfile.open(path, "w") as archive:
        for name, data in (members if members is not None else {"holiday/beach.png": buffer.getvalue()}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def dreambooth(tmp_path) -> Path:
    """A DreamBooth folder with one subject, which also holds the user's `val-photos.tar`."""
    src = tmp_path / "dreambooth"
    (src / "dog").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src / "dog" / "00.png")
    (src / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ndog,dog\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} on the beach'.format(unique_token, class_token)\n]\n"
    )
    photo_tar(src / "val-photos.tar")
    return src


# 1. --overwrite deleted any train-*.tar / val-*.tar, a divrl shard or not ---------------------------------------------


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_tar_named_like_a_shard_that_is_not_one_is_never_deleted(console, dreambooth, overwrite):
    before = snapshot(dreambooth)
    code, printed = console(
        "data",
        "dreambooth",
        "--src",
        str(dreambooth),
        "--out",
        str(dreambooth),
        *(["--overwrite"] if overwrite else []),
    )
    assert code == 2 and snapshot(dreambooth) == before  # the photos kept, nothing written
    assert (
        f"divrl data dreambooth: --out {dreambooth} holds val-photos.tar, which is not a divrl shard (its first "
        f"sample 'holiday/beach' lacks holiday/beach.json or holiday/beach.ref.png, which every divrl sample "
        f"holds)"
    ) in printed.err
    assert "move it away or choose another --out; nothing was written" in printed.err
    assert ("--overwrite would delete it" if overwrite else "training would read it with the new shards") in printed.err
    assert "already holds" not in printed.err and "shard(s)" not in printed.err


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda path: path.write_bytes(b"my notes"), "it is not a tar archive"),
        (lambda path: photo_tar(path, {}), "it is an empty tar archive"),
        (lambda path: path.mkdir(), "it is not a file"),
        (lambda path: photo_tar(path, {"a b.json": b"{}", "a b.ref.png": b""}), "is not a divrl identity id"),
    ],
)
def test_what_is_not_a_divrl_shard_is_named_with_the_reason(tmp_path, make, why):
    make(tmp_path / "train-000000.tar")
    assert why in C.shard_error(tmp_path / "train-000000.tar")


def test_divrl_shards_are_recognised_and_replaced_by_overwrite(tmp_path, console):
    assert all(C.shard_error(path) is None for path in (ROOT / "data/demo").glob("*.tar"))
    out = tmp_path / "out"
    assert (
        main(
            ["data", "synthetic", "--out", str(out), "--num-identities", "2", "--resolution", "16", "--shard-size", "1"]
        )
        == 0
    )
    assert [C.shard_error(path) for path in sorted(out.glob("*.tar"))] == [None, None]
    code, printed = console("data", "synthetic", "--out", str(out), "--num-identities", "1", "--resolution", "16")
    assert code == 2 and f"--out {out} already holds 2 divrl shard(s) (e.g. train-000000.tar)" in printed.err
    assert (
        main(["data", "synthetic", "--out", str(out), "--num-identities", "1", "--resolution", "16", "--overwrite"])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]


# 2. every *.tar.partial in --out was deleted --------------------------------------------------------------------------


def test_only_the_partial_shards_divrl_writes_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = {
        name: b"the user's"
        for name in (
            "dreambooth.tar.partial",
            "train-photos.tar.partial",
            "val-000000.tar.partial.bak",
            "train-1.tar.partial",
        )
    }
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / "val-000003.tar.partial").write_bytes(b"half a shard")  # a killed conversion's
    (out / "train-0000012.tar.partial").write_bytes(b"half a shard")
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "1", "--resolution", "16"]) == 0
    assert snapshot(out) == {**mine, "train-000000.tar": (out / "train-000000.tar").read_bytes()}
    assert C.is_stale_partial(out / "dreambooth.tar.partial") is False


# 3. --resolution 1..15 wrote images divrl sample / score refuse -------------------------------------------------------


@pytest.mark.parametrize("resolution", ["1", "7", str(MIN_SIDE - 1)])
def test_a_resolution_under_min_side_is_refused(console, tmp_path, resolution):
    out = tmp_path / "out"
    code, printed = console("data", "synthetic", "--out", str(out), "--resolution", resolution)
    assert code == 2 and not out.exists()
    assert (
        f"divrl data: --resolution {resolution} must be 0 (keep the source's sizes) or >= {MIN_SIDE} (divrl sample "
        f"and score refuse images under {MIN_SIDE}x{MIN_SIDE} pixels: DINOv2 reads 14-pixel patches"
    ) in printed.err


def test_resolution_zero_and_min_side_still_convert(tmp_path):
    for resolution, side in (("0", 128), (str(MIN_SIDE), MIN_SIDE)):  # 0: the synthetic world's own 128 px
        out = tmp_path / resolution
        assert main(["data", "synthetic", "--out", str(out), "--num-identities", "1", "--resolution", resolution]) == 0
        with tarfile.open(out / "train-000000.tar") as archive:
            data = archive.extractfile("synth_00000.ref.png").read()
        assert Image.open(io.BytesIO(data)).size == (side, side)


def test_a_precompute_resolution_under_min_side_is_refused(console, tmp_path):
    out = tmp_path / "out"  # 8 is a multiple of the tiny model's packing (4): only MIN_SIDE refuses it
    code, printed = console(
        "data",
        "synthetic",
        "--out",
        str(out),
        "--num-identities",
        "1",
        "--resolution",
        "16",
        "--precompute",
        DEMO_MODEL,
        "--device",
        "cpu",
        "--precompute-resolution",
        "8",
    )
    assert code == 2 and not out.exists() and "multiple" not in printed.err
    assert (
        f"--precompute-resolution 8 must be >= {MIN_SIDE} (divrl sample and score refuse images under "
        f"{MIN_SIDE}x{MIN_SIDE} pixels"
    ) in printed.err and "nothing was written" in printed.err


# 4. --unique-token was silently ignored -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["synthetic", "dreambench", "psrbench", "syncd"])
def test_unique_token_is_refused_for_sources_without_it(console, tmp_path, source):
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "out"
    code, printed = console(
        "data",
        source,
        *(["--src", str(src)] if source != "synthetic" else []),
        "--out",
        str(out),
        "--unique-token",
        "sks",
    )
    assert code == 2 and not out.exists()
    assert f"divrl data {source}" in printed.err and "--unique-token applies only to other sources" in printed.err
    assert "--unique-token: dreambooth" in printed.err and "nothing was written" in printed.err


def test_unique_token_still_reaches_dreambooth_prompts(tmp_path, dreambooth):
    (dreambooth / "val-photos.tar").unlink()
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "dreambooth",
                "--src",
                str(dreambooth),
                "--out",
                str(out),
                "--resolution",
                "16",
                "--unique-token",
                "sks",
            ]
        )
        == 0
    )
    with tarfile.open(out / "train-000000.tar") as archive:
        assert b"a sks dog" in archive.extractfile("dog.json").read()


# 5. a SynCD --src that is not a Parquet file --------------------------------------------------------------------------


def test_a_syncd_src_that_is_not_parquet_is_named(console, tmp_path):
    pytest.importorskip("pyarrow")
    junk = tmp_path / "x.parquet"
    junk.write_bytes(b"not a parquet file at all")
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"")
    takes = "syncd's --src takes a SynCD release folder (its *metadata.json files) or DivRL's parquet copy"
    for src, says in (
        (junk, f"--src {junk} is not a Parquet file (pyarrow: Parquet magic bytes not found"),
        (folder, f"--src {folder}: {folder / 'part-0.parquet'} is not a Parquet file (pyarrow: "),
    ):
        out = tmp_path / "out"
        code, printed = console("data", "syncd", "--src", str(src), "--out", str(out))
        assert code == 2 and not out.exists() and "Traceback" not in printed.err
        assert f"divrl data syncd (parquet): {says}" in printed.err and takes in printed.err
        assert "nothing was written" in printed.err
    with pytest.raises(ValueError, match="is not a Parquet file"):  # raised by the call, before any row is read
        C.read_syncd_parquet(junk)


# 6. --subject-weights -1,2: argparse's "expected one argument" --------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ("--subjects", "2,3", "--subject-weights", "-1,2"),
            "divrl data synthetic: --subject-weights -1,2: every weight must be a finite number >= 0",
        ),
        (
            ("--subjects", "2,3", "--subject-weights", "-inf,1"),
            "divrl data synthetic: --subject-weights -inf,1: every weight must be a finite number >= 0",
        ),
        (("--subjects", "-2,3"), "divrl data synthetic: --subjects takes counts among 2, 3, 4, got -2,3"),
    ],
)
def test_a_value_starting_with_a_dash_reaches_the_flags_own_check(console, tmp_path, flags, says):
    out = tmp_path / "out"
    code, printed = console("data", "synthetic", "--out", str(out), *flags)
    assert code == 2 and says in printed.err and not out.exists()
    assert "expected one argument" not in printed.err and "usage:" not in printed.err


def test_the_equals_form_and_a_missing_value_are_read_as_before(console, tmp_path):
    code, printed = console(
        "data", "synthetic", "--out", str(tmp_path / "o"), "--subjects", "2,3", "--subject-weights=-1,2"
    )
    assert code == 2 and "--subject-weights -1,2: every weight must be" in printed.err
    code, printed = console("data", "synthetic", "--subjects", "2,3", "--subject-weights", "--out", str(tmp_path / "o"))
    assert code == 2 and "argument --subject-weights: expected one argument" in printed.err


def test_shards_with_references_under_the_minimum_side_are_bad_samples(tmp_path):
    """Shards written before divrl data refused --resolution 1-15 (or by hand): training and validation skip a 7x7
    reference as a bad sample, named and counted (was: trained on silently)."""
    import webdataset as wds

    from divrl.data.schema import IdentityRecord
    from divrl.data.stream import SkipCounter, read_identities

    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as writer:
        writer.write(
            IdentityRecord(
                "tiny-dog", [Image.new("RGB", (7, 7), (200, 30, 30))], ["a photo"], [None], source="test"
            ).to_sample()
        )
        writer.write(
            IdentityRecord(
                "dog", [Image.new("RGB", (16, 16), (200, 30, 30))], ["a photo"], [None], source="test"
            ).to_sample()
        )
    skips = SkipCounter(max_consecutive=10)
    assert [r.id for r in read_identities([str(shard)], skips)] == ["dog"]
    assert skips.count == 1 and "reference 0 is 7x7; references must be at least 16x16 pixels" in skips.reasons[0]

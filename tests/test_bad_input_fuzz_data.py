"""Bad input a fuzz of `divrl score`, `divrl data` and the shard readers found: each case here destroyed an input
image, spun forever at 100% CPU, exited 0 having validated nothing, wrote into the current folder, printed a torch or
transformers traceback, or a message that named no flag. Each is refused with one sentence naming the input (flag,
key or path) and the fix, before the expensive work."""

from __future__ import annotations

import json
import signal
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from divrl.cli import expected_error
from divrl.data import synthetic_records, write_shards
from divrl.data.datamodule import IdentityDataModule, check_shards
from divrl.data.schema import REF_KEY
from divrl.data.stream import TrainConditionStream, ValConditionStream

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = str(ROOT / "data/demo/tiny-kontext")


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """A reference, its mask and two generated images, 32x32."""
    paths = {}
    for name, colour in (("ref", (200, 30, 30)), ("g0", (30, 200, 30)), ("g1", (30, 30, 200))):
        paths[name] = tmp_path / f"{name}.png"
        image = Image.new("RGB", (32, 32), (255, 255, 255))
        image.paste(Image.new("RGB", (16, 16), colour), (8, 8))
        image.save(paths[name])
    paths["mask"] = tmp_path / "mask.png"
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(paths["mask"])
    return paths


@pytest.fixture
def empty_tar(tmp_path) -> Path:
    path = tmp_path / "empty.tar"
    tarfile.open(path, "w").close()  # a valid tar archive with no member
    return path


@pytest.fixture
def junk_tar(tmp_path) -> Path:
    """A tar archive whose every sample is bad (an unreadable reference)."""
    path = tmp_path / "junk.tar"
    with wds.TarWriter(str(path)) as writer:
        for k in range(3):
            writer.write({"__key__": f"x{k}", REF_KEY: b"junk", "json": b"{}"})
    return path


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("good")
    return [str(p) for p in write_shards(synthetic_records(4, size=16, prompts_per_identity=2), out, shard_size=2)]


def no_scoring(monkeypatch):
    """Scoring fails the test: the refusal must come first."""
    from divrl.rewards import GatedReward

    def scored(*args, **kwargs):
        raise AssertionError("scored before the input was checked")

    monkeypatch.setattr(GatedReward, "forward", scored)


# 1. divrl score --json naming an input (data loss) or a file it did not write -----------------------------------------


@pytest.mark.parametrize("target", ["g0", "ref", "mask"])
def test_score_json_naming_one_of_the_inputs_is_refused_and_the_input_kept(console, images, monkeypatch, target):
    no_scoring(monkeypatch)
    before = images[target].read_bytes()
    code, printed = console(
        "score",
        "--size",
        "32",
        "--reference",
        str(images["ref"]),
        "--ref-mask",
        str(images["mask"]),
        str(images["g0"]),
        "--json",
        str(images[target]),
    )
    assert code == 1 and "Traceback" not in printed.err and "nSSM" not in printed.out
    assert f"divrl score: --json {images[target]} is one of the inputs" in printed.err
    assert images[target].read_bytes() == before


def test_score_json_over_a_file_divrl_score_did_not_write_is_refused(console, images, tmp_path, monkeypatch):
    scores = tmp_path / "scores.json"
    command = ("score", "--size", "32", "--reference", str(images["ref"]), str(images["g0"]), "--json", str(scores))
    assert console(*command)[0] == 0 and console(*command)[0] == 0  # its own scores file is rewritten
    assert [row["image"] for row in json.loads(scores.read_text())["scores"]] == ["g0.png"]
    no_scoring(monkeypatch)
    for text in ('{"config": 1}', "[1, 2]", '"scores"', "notes, not JSON", ""):
        scores.write_text(text)
        code, printed = console(*command)
        assert code == 1 and "nSSM" not in printed.out and scores.read_text() == text
        assert f"--json {scores} exists and is not a scores file of divrl score" in printed.err


# 9. divrl score: thresholds, weights and masks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--tau-s", "nan", "must be a finite number in [0, 1]"),
        ("--tau-s", "2", "must be in [0, 1]"),
        ("--tau-v", "-0.5", "must be in [0, 1]"),
        ("--threshold", "-1", "must be in [0, 1]"),
        ("--threshold", "1.5", "must be in [0, 1]"),
        ("--weight", "nan", "must be a finite number >= 0"),
        ("--weight", "inf", "must be a finite number >= 0"),
        ("--weight", "-1", "must be >= 0"),
    ],
)
def test_score_refuses_thresholds_and_weights_out_of_range(console, flag, value, says):
    code, printed = console("score", flag, value)
    assert code == 2 and f"argument {flag}: {says}, got {value}" in printed.err
    assert "Traceback" not in printed.err and "nSSM" not in printed.out


def test_score_keeps_thresholds_and_weights_in_range(console):
    assert console("score", "--tau-s", "0", "--tau-v", "1", "--threshold", "1", "--weight", "0")[0] == 0


def test_score_refuses_a_ref_mask_of_another_size_or_without_subject_naming_the_flag(
    console, images, tmp_path, monkeypatch
):
    no_scoring(monkeypatch)
    small, black = tmp_path / "small.png", tmp_path / "black.png"
    Image.new("L", (20, 16), 255).save(small)
    Image.new("L", (32, 32), 0).save(black)
    command = ("score", "--size", "32", "--reference", str(images["ref"]), str(images["g0"]), "--ref-mask")
    code, printed = console(*command, str(small))
    assert code == 1 and "nSSM" not in printed.out
    assert f"--ref-mask {small} is 20x16 but --reference {images['ref']} is 32x32; resize the mask" in printed.err
    code, printed = console(*command, str(black))
    assert code == 1 and "nSSM" not in printed.out and "ref_mask=None" not in printed.err
    assert f"--ref-mask {black} has no subject pixel (all black" in printed.err


# 2. shards that hold no sample, or are no tar archive: refused at setup; a stream of empty shards stops ---------------


def test_datamodule_refuses_empty_and_non_tar_local_shards_at_setup(empty_tar, good_shards, tmp_path):
    text = tmp_path / "train-000000.tar"
    text.write_text("not a tar")
    png = tmp_path / "ref.png"
    Image.new("RGB", (8, 8)).save(png)
    for shards, val, says in (
        ([*good_shards, str(empty_tar)], None, f"data.shards: {empty_tar} holds no sample"),
        (str(text), None, f"data.shards: {text} is not a tar archive"),
        (good_shards, str(empty_tar), f"data.val_shards: {empty_tar} holds no sample"),
        (good_shards, str(png), f"data.val_shards: {png} is not a tar archive"),
    ):
        with pytest.raises(ValueError, match="^" + says.replace(".", r"\.")) as caught:
            IdentityDataModule(shards, val_shards=val).setup("fit")
        assert expected_error(caught.value) == str(caught.value)  # one sentence, no traceback
    IdentityDataModule(good_shards).setup("fit")
    check_shards(["pipe:cat nothing.tar", "https://example.com/x.tar"], "data.shards")  # checked when read


def test_a_training_stream_of_empty_shards_stops_instead_of_spinning(empty_tar):
    def spun(*_):
        raise TimeoutError("the stream of empty shards spun for 60 s")

    previous = signal.signal(signal.SIGALRM, spun)
    signal.alarm(60)
    try:
        stream = TrainConditionStream([str(empty_tar)], batch_size=1, steps_per_epoch=2, max_consecutive_bad=20)
        with pytest.raises(RuntimeError, match=r"20 shards drawn in a row held no sample \(last: .*empty.tar"):
            next(iter(stream))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_shards_of_one_sample_never_count_as_empty(tmp_path):
    # webdataset reads a shard's last sample only after it opened the next shard: the guard must not take that lag
    # for an empty shard, even with the smallest bound
    urls = [str(p) for p in write_shards(synthetic_records(3, size=16), tmp_path, shard_size=1)]
    stream = TrainConditionStream(urls, batch_size=2, steps_per_epoch=20, max_consecutive_bad=2, shuffle_buffer=1)
    assert sum(len(batch) for batch in stream) == 40


# 3. validation that reads no identity --------------------------------------------------------------------------------


def test_validation_that_reads_no_identity_is_refused_with_the_skips(junk_tar, good_shards):
    with pytest.raises(
        ValueError,
        match=r"no validation identity could be read from data.val_shards \(.*junk.tar\): "
        r"3 bad sample\(s\) skipped \(first: .*junk.tar:x0: .*not a readable image",
    ):
        list(ValConditionStream([str(junk_tar)], batch_size=1, num_identities=2))
    module = IdentityDataModule(str(junk_tar))  # validating on the training shards: named as such
    module.setup("validate")
    with pytest.raises(ValueError, match=r"from data.shards \(") as caught:
        list(module.val_dataloader())
    assert expected_error(caught.value) == str(caught.value)
    assert len(list(ValConditionStream(good_shards, batch_size=1, num_identities=2))) == 2


# 4.-8. divrl data ----------------------------------------------------------------------------------------------------


def test_data_refuses_an_empty_out(console, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, printed = console("data", "synthetic", "--out", "", "--num-identities", "1", "--resolution", "16")
    assert code == 2 and "argument --out: must name a folder, got ''" in printed.err
    assert not list(tmp_path.iterdir())  # nothing written into the current folder


@pytest.mark.parametrize("fraction", ["1.5", "nan", "-0.5"])
def test_data_names_each_flag_out_of_range_in_one_message(console, tmp_path, fraction):
    out = tmp_path / "out"
    code, printed = console("data", "synthetic", "--out", str(out), "--shard-size", "0", "--val-fraction", fraction)
    assert code == 2 and not out.exists()
    assert (
        f"divrl data: --shard-size 0 must be >= 1; --val-fraction {float(fraction)} must be a share in [0, 1]; "
        f"nothing was written"
    ) in printed.err


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the precompute model fails the test: the refusal must come first."""
    from divrl.policy import KontextConfig

    def build(self):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(KontextConfig, "build", build)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--max-sequence-length", "0"), "--max-sequence-length 0 must be >= 1"),
        (("--precompute-resolution", "-8"), "--precompute-resolution -8 must be >= 1"),
        (("--device", "banana"), "--device 'banana' is not a torch device"),
        (("--device", "cuda:99"), "--device cuda:99: this machine has "),
    ],
)
def test_data_precompute_flags_are_refused_before_the_model_is_loaded(console, tmp_path, no_model_load, flags, says):
    out = tmp_path / "out"
    code, printed = console("data", "synthetic", "--out", str(out), "--precompute", DEMO_MODEL, *flags)
    assert code == 2 and says in printed.err and "Traceback" not in printed.err and not out.exists()


def test_data_device_beyond_the_gpus_is_refused_naming_them(console, tmp_path, no_model_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, printed = console(
        "data", "synthetic", "--out", str(tmp_path / "o"), "--precompute", DEMO_MODEL, "--device", "cuda:7"
    )
    assert code == 2 and "--device cuda:7: this machine has 2 cuda device(s), cuda:0 .. cuda:1" in printed.err


def test_data_precompute_resolution_the_model_cannot_take_names_the_flag(console, tmp_path):
    out = tmp_path / "out"
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
        "7",
    )
    assert code == 2 and not out.exists()
    assert "--precompute-resolution 7 must be a multiple of 4" in printed.err


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        ("nan,1", "--subject-weights nan,1: every weight must be a finite number >= 0"),
        ("inf,1", "--subject-weights inf,1: every weight must be a finite number >= 0"),
        ("0,0", "--subject-weights 0,0 sum to 0: give at least one --subjects count a positive weight"),
    ],
)
def test_data_refuses_subject_weights_that_are_not_finite_or_sum_to_zero(console, tmp_path, weights, says):
    out = tmp_path / "out"
    code, printed = console("data", "synthetic", "--out", str(out), "--subjects", "2,3", "--subject-weights", weights)
    assert code == 2 and says in printed.err and "Total of weights" not in printed.err and not out.exists()


@pytest.mark.parametrize(
    ("source", "needs"),
    [
        ("dreambooth", "prompts_and_classes.txt"),
        ("dreambench", "data/images"),
        ("psrbench", "<Subset>.json"),
        ("syncd", ".parquet file"),
    ],
)
def test_data_src_that_is_a_file_is_refused_where_a_folder_is_read(console, tmp_path, source, needs):
    src = tmp_path / "notes.txt"
    src.write_text("a file")
    code, printed = console("data", source, "--src", str(src), "--out", str(tmp_path / "out"))
    assert code == 2 and f"divrl data {source}: --src {src} is a file; {source} reads" in printed.err
    assert needs in printed.err and "is missing" not in printed.err and not (tmp_path / "out").exists()

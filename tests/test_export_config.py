"""``divrl.export.sampling_config``: a saved fit configuration as ``divrl sample`` takes it (unit, no model)."""

from pathlib import Path

import pytest
import torch

from divrl.export import ExportError, sampling_config

SAVED = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 8, "strategy": "ddp", "logger": True},
    "model": {"policy": {"model": "x"}},
    "data": {"shards": "s"},
    "optimizer": None,
    "lr_scheduler": None,
    "ckpt_path": "last",
    "weights_only": None,
}


def test_fits_own_keys_are_dropped_and_one_device_is_one_process_without_a_logger():
    kept = sampling_config(SAVED)
    assert list(kept) == ["seed_everything", "trainer", "model", "data"] and kept["trainer"] == SAVED["trainer"]
    one = sampling_config(SAVED, one_device=True)
    assert one["trainer"] == {"accelerator": "cpu", "devices": 1, "strategy": "auto", "logger": False, "num_nodes": 1}
    assert SAVED["trainer"]["devices"] == 8  # the caller's dict is not changed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU configuration is valid on this machine")
def test_a_gpu_configuration_on_a_machine_without_one_is_refused_with_the_way_out():
    gpu = {**SAVED, "trainer": {"accelerator": "gpu", "devices": 8}}
    with pytest.raises(ExportError, match=r"^runs/x/config.yaml trains on GPUs and this machine has none; .*--samples"):
        sampling_config(gpu, one_device=True, where="runs/x/config.yaml")
    assert sampling_config(gpu)["trainer"]["devices"] == 8  # the exported training config keeps the run's settings


def test_the_licence_comes_from_the_bases_card_else_from_its_family():
    from divrl.model_card import base_license

    root = Path(__file__).resolve().parents[1]
    assert base_license(str(root / "data/demo/tiny-kontext")) == {"license": "apache-2.0"}  # the folder's own README.md
    assert base_license("Qwen/Qwen-Image-Edit-2511") == {"license": "apache-2.0"}  # QwenEditConfig.hub_licenses
    assert base_license("black-forest-labs/FLUX.1-Kontext-dev")["license_name"] == "flux-1-dev-non-commercial-license"
    assert base_license("someone/unknown-model") == {}


@pytest.mark.parametrize(
    "class_path",
    ["divrl.policy.flux2.Flux2KleinConfig", "divrl.policy.qwen_image.QwenEditConfig", "divrl.policy.KontextConfig"],
)
def test_a_two_reference_card_lists_both_exported_photos_or_says_the_pipeline_takes_one(class_path, tmp_path):
    """The card of a two-reference run: klein's and Qwen-Image-Edit-Plus's snippet loads both photos under the names
    ``divrl export`` copies them to (``reference_0.png``, ``reference_0_1.png``), on the Hub by URL; Kontext's pipeline
    takes one, so its card sends the reader to ``divrl sample`` and shows no snippet."""
    from divrl.export import RunFiles, Sample, Samples
    from divrl.model_card import model_card

    config = {"model": {"policy": {"class_path": class_path, "init_args": {"model": "tiny"}}, "sampling": {}}}
    config["model"]["sampling"]["resolution"] = 512
    item = Sample("0", "a photo of both", [], [tmp_path / "a.png", tmp_path / "b.png"], None, seed=7)
    samples = Samples(tmp_path, num_steps=3, noise_level=0.0, items=[item])
    card = model_card(RunFiles(lora=tmp_path, config=config), "base", {}, samples, "me/it", tmp_path, [])
    url = "https://huggingface.co/me/it/resolve/main/images/reference_0"
    if class_path.endswith("KontextConfig"):
        assert "takes only one, so sample it with `divrl sample` instead" in card and "```python" not in card
        return
    code = card.split("```python\n")[1].split("```")[0]
    assert f'load_image("{url}.png"), load_image("{url}_1.png")' in code
    assert ("as_divrl_reads" in code) == class_path.endswith("Flux2KleinConfig")  # klein resizes each to 512
    compile(code, "card", "exec")

"""DINOv2Backbone on tiny, randomly initialised DINOv2 checkpoints written to disk (offline, no downloads).

The checkpoints go through ``save_pretrained`` and are loaded back by ``DINOv2Backbone(model=folder)``: the same
``AutoModel`` / ``AutoImageProcessor`` path a Hub id takes. Every feature check is compared with an independent
computation (resize, normalise, call the transformers model, drop the prefix tokens, reshape) written out here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from divrl.rewards.backbones.base import Features
from divrl.rewards.backbones.dinov2 import DINOv2Backbone

HIDDEN = 32
PATCH = 14
SAVED_MEAN = (0.3, 0.4, 0.5)
SAVED_STD = (0.2, 0.25, 0.3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TINY = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=PATCH,
    image_size=28,
)


def _save_processor(folder) -> None:
    # The PIL flavour exists in transformers 5.x and needs no torchvision; 4.x only has BitImageProcessor.
    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    cls(image_mean=list(SAVED_MEAN), image_std=list(SAVED_STD)).save_pretrained(folder)


def _build(model_cls, config, folder, seed: int, processor: bool):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    if processor:
        _save_processor(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, in-memory model) of a tiny Dinov2Model with a preprocessor config holding non-default stats."""
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    return folder, _build(Dinov2Model, Dinov2Config(**TINY), folder, seed=0, processor=True)


@pytest.fixture(scope="module")
def tiny_registers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dinov2-registers")
    config = Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)
    return folder, _build(Dinov2WithRegistersModel, config, folder, seed=1, processor=True)


@pytest.fixture(scope="module")
def tiny_bare(tmp_path_factory):
    """A tiny Dinov2Model saved without any preprocessor config."""
    folder = tmp_path_factory.mktemp("tiny-dinov2-bare")
    return folder, _build(Dinov2Model, Dinov2Config(**TINY), folder, seed=2, processor=False)


@pytest.fixture(scope="module")
def backbone8(tiny):
    return DINOv2Backbone(model=str(tiny[0]), grid_size=8)


def _manual(model, images, grid, mean, std, skip, hidden_state=None):
    """The features computed by hand: resize, normalise, run the model, drop ``skip`` prefix tokens, reshape."""
    side = grid * PATCH
    x = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=hidden_state is not None)
    tokens = out.last_hidden_state if hidden_state is None else out.hidden_states[hidden_state]
    tokens = tokens[:, skip:]
    assert tokens.shape[1] == grid * grid
    return tokens.reshape(images.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


def _images(batch, height, width, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_shared_tensor(tiny, backbone8):
    images = _images(2, 90, 120)
    features = backbone8(images)
    assert isinstance(features, Features)
    assert features.semantic is features.visual
    assert features.semantic.shape == (2, HIDDEN, 8, 8)
    assert features.semantic.dtype == torch.float32

    big = DINOv2Backbone(model=str(tiny[0]))  # default grid 48 -> 672 px input
    assert big.grid_size == 48 and big.patch_size == PATCH and big.resolution == 672
    out = big(images)
    assert out.semantic is out.visual
    assert out.semantic.shape == (2, HIDDEN, 48, 48)
    assert torch.isfinite(out.semantic).all()


def test_matches_manual_computation_with_saved_stats(tiny, backbone8):
    folder, model = tiny
    # The saved (non-ImageNet) preprocessor statistics were read.
    assert torch.allclose(backbone8.image_mean.flatten(), torch.tensor(SAVED_MEAN))
    assert torch.allclose(backbone8.image_std.flatten(), torch.tensor(SAVED_STD))
    assert backbone8.num_register_tokens == 0

    images = _images(2, 150, 130, seed=3)
    expected = _manual(model, images, 8, SAVED_MEAN, SAVED_STD, skip=1)
    got = backbone8(images).semantic
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # ... and the statistics matter: ImageNet normalisation gives different features.
    other = _manual(model, images, 8, IMAGENET_MEAN, IMAGENET_STD, skip=1)
    assert (got - other).abs().max() > 1e-2


def test_registers_are_dropped(tiny_registers):
    folder, model = tiny_registers
    backbone = DINOv2Backbone(model=str(folder), grid_size=8)
    assert type(backbone.model).__name__ == "Dinov2WithRegistersModel"
    assert backbone.num_register_tokens == 4

    images = _images(2, 100, 140, seed=4)
    got = backbone(images).semantic
    assert got.shape == (2, HIDDEN, 8, 8)
    torch.testing.assert_close(got, _manual(model, images, 8, SAVED_MEAN, SAVED_STD, skip=1 + 4), atol=1e-5, rtol=0)
    # Keeping the registers (dropping only CLS) would shift every cell: not what the backbone returns.
    with torch.no_grad():
        x = F.interpolate(images, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
        x = (x - torch.tensor(SAVED_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAVED_STD).view(1, 3, 1, 1)
        shifted = model(pixel_values=x).last_hidden_state[:, 1 : 1 + 64]
    assert (got.flatten(2).transpose(1, 2) - shifted).abs().max() > 1e-2


def test_intermediate_layer_is_hidden_state_without_final_norm(tiny, backbone8):
    folder, model = tiny
    backbone = DINOv2Backbone(model=str(folder), grid_size=8, layer=1)
    images = _images(2, 112, 112, seed=5)
    got = backbone(images).semantic
    torch.testing.assert_close(
        got, _manual(model, images, 8, SAVED_MEAN, SAVED_STD, skip=1, hidden_state=1), atol=1e-5, rtol=0
    )
    assert (got - backbone8(images).semantic).abs().max() > 1e-2  # a different layer than last_hidden_state

    with pytest.raises(ValueError, match="layer"):
        DINOv2Backbone.from_model(model, grid_size=8, layer=3)  # 2 blocks -> hidden states 0..2


def test_no_preprocessor_config_falls_back_to_imagenet(tiny_bare):
    folder, model = tiny_bare
    assert not (folder / "preprocessor_config.json").exists()
    backbone = DINOv2Backbone(model=str(folder), grid_size=8)
    assert torch.allclose(backbone.image_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(backbone.image_std.flatten(), torch.tensor(IMAGENET_STD))
    images = _images(1, 64, 96, seed=6)
    torch.testing.assert_close(
        backbone(images).semantic, _manual(model, images, 8, IMAGENET_MEAN, IMAGENET_STD, skip=1), atol=1e-5, rtol=0
    )


def test_missing_local_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-dinov2"
    with pytest.raises(FileNotFoundError) as info:
        DINOv2Backbone(model=str(missing))
    assert str(missing) in str(info.value)


def test_unavailable_hub_id_offline_is_a_clear_error():
    name = "divrl-tests/no-such-dinov2-checkpoint"
    with pytest.raises(OSError) as info:
        DINOv2Backbone(model=name, local_files_only=True)
    message = str(info.value)
    assert name in message and "local_files_only" in message and "local folder" in message


def test_list_of_pil_images_matches_tensor(backbone8):
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8) for _ in range(2)]
    pil = [Image.fromarray(a, mode="RGB") for a in arrays]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    from_pil = backbone8(pil).semantic
    assert from_pil.shape == (2, HIDDEN, 8, 8)
    torch.testing.assert_close(from_pil, backbone8(tensor).semantic, atol=1e-6, rtol=0)


def test_batch_independence(backbone8):
    images = _images(3, 80, 80, seed=8)
    batched = backbone8(images).semantic
    for k in range(3):
        alone = backbone8(images[k : k + 1]).semantic
        torch.testing.assert_close(batched[k : k + 1], alone, atol=1e-5, rtol=0)


def test_from_model_matches_loaded_backbone(tiny, backbone8):
    folder, model = tiny
    wrapped = DINOv2Backbone.from_model(model, grid_size=8, image_mean=SAVED_MEAN, image_std=SAVED_STD)
    images = _images(2, 70, 50, seed=9)
    torch.testing.assert_close(wrapped(images).semantic, backbone8(images).semantic, atol=1e-5, rtol=0)
    # Default statistics are ImageNet's.
    default = DINOv2Backbone.from_model(model, grid_size=8)
    assert torch.allclose(default.image_mean.flatten(), torch.tensor(IMAGENET_MEAN))

    with pytest.raises(ValueError, match="DINOv2"):
        DINOv2Backbone.from_model(torch.nn.Linear(2, 2))


def test_frozen_and_eval(backbone8):
    assert not backbone8.training and not backbone8.model.training
    assert all(not p.requires_grad for p in backbone8.parameters())
    backbone8.train()  # a parent module switching to train mode must not enable dropout in the frozen backbone
    assert not backbone8.model.training


def test_bfloat16_weights_float32_output(tiny, backbone8):
    backbone = DINOv2Backbone(model=str(tiny[0]), grid_size=8, dtype="bfloat16")
    assert next(backbone.model.parameters()).dtype == torch.bfloat16
    images = _images(2, 112, 112, seed=10)
    got = backbone(images).semantic
    assert got.dtype == torch.float32
    reference = backbone8(images).semantic
    cosine = F.cosine_similarity(got.flatten(1), reference.flatten(1), dim=1)
    assert (cosine > 0.99).all()

    with pytest.raises(ValueError, match="dtype"):
        DINOv2Backbone(model=str(tiny[0]), grid_size=8, dtype="int8")

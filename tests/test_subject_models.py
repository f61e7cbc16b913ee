"""GroundingDINODetector and CLSEmbedder on tiny, randomly initialised checkpoints written to disk (offline).

The checkpoints (and the detector's processor: a BERT tokenizer built from a small vocabulary and a Grounding DINO
image processor) go through ``save_pretrained`` and are loaded back by folder: the same ``from_pretrained`` path a Hub
id takes. Every output is compared with an independent computation written out here: the transformers processor,
model and post-processing called directly for the detector; PIL resize, centre crop, normalisation and the model's
CLS token for the embedder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizerFast,
    Dinov2Config,
    Dinov2Model,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    SwinConfig,
    ViTConfig,
    ViTModel,
)

from divrl.rewards.subject_models import CLSEmbedder, GroundingDINODetector

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "cat", "backpack", "teddy", "bear"]
HEIGHT, WIDTH = 48, 80
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: one intra-op thread is fastest, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def tiny_gdino(tmp_path_factory):
    """(folder, model, processor): a tiny random Grounding DINO (Swin backbone, 1-layer BERT, 10 queries) saved with
    its processor."""
    folder = tmp_path_factory.mktemp("tiny-grounding-dino")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))
    vocab.unlink()  # the saved tokenizer.json is what gets loaded
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=10,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():  # wider boxes, so that some cross the image's border and the clamp is tested
        for bias in {id(e.layers[-1].bias): e.layers[-1].bias for e in model.bbox_embed}.values():
            bias[2:] += 1.0
    # The PIL flavour (transformers 5.x) needs no torchvision; 4.x only has GroundingDinoImageProcessor.
    image_cls = getattr(transformers, "GroundingDinoImageProcessorPil", None)
    image_cls = image_cls or transformers.GroundingDinoImageProcessor
    processor = GroundingDinoProcessor(
        image_processor=image_cls(size={"shortest_edge": 64, "longest_edge": 96}), tokenizer=tokenizer
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def _images(seed: int, count: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _expected_boxes(model, processor, images, prompt, box_threshold, text_threshold, sort=False):
    """Independently: processor → model → post_process_grounded_object_detection, then (``sort``) sort by score, clamp,
    and drop the boxes left without area."""
    pil = [_pil(im) for im in images]
    inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(
        outputs,
        inputs["input_ids"],
        threshold=box_threshold,
        text_threshold=text_threshold,
        target_sizes=[(HEIGHT, WIDTH)] * len(pil),
    )
    boxes, raw_scores, raw_boxes = [], [], []
    for result in results:
        scores = result["scores"]
        raw_scores.append(scores)
        raw_boxes.append(result["boxes"])
        order = torch.sort(scores, descending=True, stable=True).indices if sort else torch.arange(len(scores))
        b = result["boxes"][order]
        b = torch.stack(
            [b[:, 0].clamp(0, WIDTH), b[:, 1].clamp(0, HEIGHT), b[:, 2].clamp(0, WIDTH), b[:, 3].clamp(0, HEIGHT)],
            dim=1,
        )
        boxes.append(b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])])
    return boxes, raw_scores, raw_boxes


@pytest.mark.parametrize(
    "box_threshold, text_threshold, sort", [(0.0, 0.0, False), (0.0, 0.0, True), (0.9, 0.25, False)]
)
def test_detector_matches_transformers(tiny_gdino, box_threshold, text_threshold, sort):
    folder, model, processor = tiny_gdino
    detector = GroundingDINODetector(
        str(folder),
        box_threshold=box_threshold,
        text_threshold=text_threshold,
        local_files_only=True,
        sort_by_score=sort,
    )
    images = _images(seed=1)
    got = detector(images, "  Dog ")  # the module call: Detector.forward checks the format
    expected, raw_scores, raw_boxes = _expected_boxes(
        model, processor, images, "dog.", box_threshold, text_threshold, sort
    )
    other, _, _ = _expected_boxes(model, processor, images, "dog.", box_threshold, text_threshold, not sort)

    assert isinstance(got, list) and len(got) == len(images)
    for boxes, want in zip(got, expected):
        assert boxes.dtype == torch.float32 and boxes.dim() == 2 and boxes.shape[1] == 4
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= WIDTH).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= HEIGHT).all()
        assert boxes.shape == want.shape
        torch.testing.assert_close(boxes, want, rtol=0, atol=1e-4)
    if box_threshold == 0.0:
        # Every query is a detection, and the post-processing's own order is not by score: the order is tested.
        assert all(len(b) >= 8 for b in got)
        assert any(not torch.equal(s, torch.sort(s, descending=True, stable=True).values) for s in raw_scores)
        assert any(not torch.allclose(a, b) for a, b in zip(expected, other))
        # ... and some raw boxes cross the border on each axis: the clamp is tested.
        raw = torch.cat(raw_boxes)
        assert (raw[:, 0] < 0).any() and (raw[:, 2] > WIDTH).any()
        assert (raw[:, 1] < 0).any() and (raw[:, 3] > HEIGHT).any()
    else:
        assert sum(len(b) for b in got) < 2 * 10  # the threshold removed some


def test_detector_chunks_and_prompt(tiny_gdino):
    folder, _, _ = tiny_gdino
    whole = GroundingDINODetector(str(folder), box_threshold=0.0, local_files_only=True)
    chunked = GroundingDINODetector(str(folder), box_threshold=0.0, local_files_only=True, max_batch=1)
    images = _images(seed=2, count=3)
    for a, b in zip(whole(images, "cat"), chunked(images, "cat")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert GroundingDINODetector.prompt(" Teddy Bear ") == "teddy bear."
    assert GroundingDINODetector.prompt("dog.") == "dog."
    with pytest.raises(ValueError, match="empty"):
        GroundingDINODetector.prompt("  ")
    assert not whole.model.training and not any(p.requires_grad for p in whole.model.parameters())
    whole.train()
    assert not whole.model.training


def test_detector_load_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="GroundingDINODetector.*no-such-model.*does not exist"):
        GroundingDINODetector(str(missing), local_files_only=True)
    with pytest.raises(OSError, match=r"GroundingDINODetector: cannot load model 'nobody/no-such-det'.*hf download"):
        GroundingDINODetector("nobody/no-such-det", local_files_only=True)
    with pytest.raises(ValueError, match="box_threshold"):
        GroundingDINODetector(str(missing), box_threshold=1.5)


# ---------------------------------------------------------------------------------------------------- embedder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """(folder, model): a tiny DINO-v1-like ViTModel (patch 16, 224², no pooler, as the DINO checkpoints)."""
    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(1)
    config = Dinov2Config(
        image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = Dinov2Model(config).eval()
    model.save_pretrained(folder)
    return folder, model


def _crops(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(40, 90), (300, 120), (256, 256), (17, 17), (231, 260), (9, 13)]  # 256 * 13 / 9 = 369.8: floored
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _expected_features(model, crops, resize, crop, mean, std, **forward) -> torch.Tensor:
    """Independently, as torchvision on PIL: Resize(resize, BICUBIC), CenterCrop(crop), ToTensor, Normalize."""
    pixels = []
    for c in crops:
        image = _pil(c)
        w, h = image.size
        if w <= h:
            ow, oh = resize, int(resize * h / w)
        else:
            ow, oh = int(resize * w / h), resize
        if (ow, oh) != (w, h):
            image = image.resize((ow, oh), Image.Resampling.BICUBIC)
        array = np.asarray(image).astype(np.float32) / 255
        top, left = int(round((oh - crop) / 2.0)), int(round((ow - crop) / 2.0))
        array = array[top : top + crop, left : left + crop]
        array = (array - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
    with torch.no_grad():
        cls = model(pixel_values=torch.stack(pixels), **forward).last_hidden_state[:, 0]
    return F.normalize(cls, dim=-1)


def test_cls_embedder_vit_matches_reference(tiny_vit):
    folder, model = tiny_vit
    embedder = CLSEmbedder(str(folder), local_files_only=True)
    assert embedder.model.pooler is None  # loaded with add_pooling_layer=False
    crops = _crops(seed=3)
    got = embedder(crops)
    want = _expected_features(model, crops, 256, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert got.shape == (len(crops), 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(crops)), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Crops really are told apart, and the batch is the same as one crop at a time.
    assert (got @ got.T - torch.eye(len(crops))).abs().max() < 1 - 1e-3
    one = torch.cat([embedder([c]) for c in crops])
    torch.testing.assert_close(got, one, rtol=0, atol=1e-5)


def test_cls_embedder_vit_other_crop_interpolates(tiny_vit):
    folder, model = tiny_vit
    embedder = CLSEmbedder(str(folder), resize=72, crop=64, local_files_only=True, max_batch=2)
    crops = _crops(seed=4)
    want = _expected_features(model, crops, 72, 64, IMAGENET_MEAN, IMAGENET_STD, interpolate_pos_encoding=True)
    torch.testing.assert_close(embedder(crops), want, rtol=0, atol=1e-5)


def test_cls_embedder_dinov2_matches_reference(tiny_dinov2):
    folder, model = tiny_dinov2
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    embedder = CLSEmbedder(str(folder), resize=64, crop=56, mean=mean, std=std, local_files_only=True)
    crops = _crops(seed=5)
    got = embedder(crops)
    torch.testing.assert_close(got, _expected_features(model, crops, 64, 56, mean, std), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(crops)), rtol=0, atol=1e-5)
    assert embedder.preprocess(crops[1]).shape == (3, 56, 56)


def test_cls_embedder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLSEmbedder.*does not exist"):
        CLSEmbedder(str(tmp_path / "missing"), local_files_only=True)
    with pytest.raises(OSError, match=r"CLSEmbedder: cannot load model 'nobody/no-such-embedder'.*hf download"):
        CLSEmbedder("nobody/no-such-embedder", local_files_only=True)
    with pytest.raises(ValueError, match="crop"):
        CLSEmbedder(str(tmp_path), resize=128, crop=224)

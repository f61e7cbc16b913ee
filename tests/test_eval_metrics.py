"""The evaluation metrics against hand-worked cases and brute-force loops; the model-backed embedders against
direct calls of the saved tiny models (loaded through the real ``from_pretrained`` path)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from divrl.eval import (
    BackgroundSegmenter,
    CLIPEmbedder,
    ConsistencyDiversity,
    EvalSuite,
    consistency_ratio,
    cosine,
    diversity_over_consistency,
    patch_similarity,
    scale_invariant_iou,
    summarize,
)
from divrl.rewards import FeatureScorer
from divrl.rewards.backbones import DenseDescriptor

# ---------------------------------------------------------------------------------------------------------- si-IoU


def canvas(shape, size=64, top=0, left=0, scale=1):
    """Paste a 0/1 pattern (nested lists), each pixel blown up to ``scale``², at (top, left) of a blank mask."""
    pattern = torch.tensor(shape, dtype=torch.float32)
    pattern = pattern.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    mask = torch.zeros(size, size)
    mask[top : top + pattern.shape[0], left : left + pattern.shape[1]] = pattern
    return mask


L_SHAPE = [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]  # 7 pixels
MIRRORED_L = [row[::-1] for row in L_SHAPE]  # shares the bottom row (4 pixels) with L_SHAPE: IoU 4 / 10


def test_si_iou_ignores_position_and_scale_and_measures_the_silhouette():
    ref = canvas(L_SHAPE, top=5, left=7, scale=2)[None]  # an 8x8 L at one place
    moved_bigger = canvas(L_SHAPE, top=30, left=20, scale=6)  # a 24x24 L elsewhere: the same silhouette
    mirrored = canvas(MIRRORED_L, top=2, left=40, scale=3)  # 12x12 mirrored L: 4 of 10 pixels shared
    empty = torch.zeros(64, 64)  # no subject found
    scores = scale_invariant_iou(torch.stack([moved_bigger, mirrored, empty]), ref)
    assert scores.tolist() == pytest.approx([1.0, 0.4, 0.0], abs=1e-6)


def test_si_iou_of_a_triangle_in_a_square_box_is_its_area_fraction():
    square = torch.ones(20, 20)
    triangle = torch.tril(torch.ones(20, 20))  # 210 of 400 pixels
    ref, gen = torch.zeros(1, 50, 50), torch.zeros(1, 50, 50)
    ref[0, 3:23, 10:30] = square
    gen[0, 25:45, 5:25] = triangle
    assert scale_invariant_iou(gen, ref).item() == pytest.approx(210 / 400)


def test_si_iou_refuses_an_empty_reference_mask():
    with pytest.raises(ValueError, match="reference mask is empty"):
        scale_invariant_iou(torch.ones(1, 8, 8), torch.zeros(1, 8, 8))


# ----------------------------------------------------------------------------------------------------------- sDINO


def grid(vectors, h, w):
    """(N, C) patch vectors in row-major order → a (1, C, h, w) grid."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, -1, h, w)


def test_sdino_is_the_mean_best_patch_cosine():
    s = 1 / math.sqrt(2)
    ref = grid([[1, 0, 0], [0, 1, 0]], 1, 2)  # reference patches: e0, e1
    gen = grid([[2, 0, 0], [s, s, 0], [0, 0, 1], [0, 3, 0]], 2, 2)  # best cosines: 1, 1/√2, 0, 1
    assert patch_similarity(gen, ref).item() == pytest.approx((1 + s + 0 + 1) / 4)
    # the reference mask leaves only e0: e1-like patches now match at 0; the generated mask keeps the top row
    ref_mask = torch.tensor([[[1.0, 0.0]]])
    assert patch_similarity(gen, ref, ref_mask=ref_mask).item() == pytest.approx((1 + s + 0 + 0) / 4)
    gen_mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert patch_similarity(gen, ref, gen_mask=gen_mask).item() == pytest.approx((1 + s) / 2)


def test_sdino_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    gen, ref = torch.randn(3, 8, 4, 5, generator=g), torch.randn(1, 8, 3, 3, generator=g)
    expected = []
    for b in range(3):
        best = []
        for i in range(4):
            for j in range(5):
                v = gen[b, :, i, j]
                best.append(
                    max(F.cosine_similarity(v, ref[0, :, p, q], dim=0).item() for p in range(3) for q in range(3))
                )
        expected.append(sum(best) / len(best))
    assert patch_similarity(gen, ref).tolist() == pytest.approx(expected, abs=1e-5)


def test_cosine_broadcasts_one_reference():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    assert cosine(a, torch.tensor([[3.0, 0.0]])).tolist() == pytest.approx([1.0, 1 / math.sqrt(2), -1.0])


# ------------------------------------------------------------------------------------------------ trade-off metrics

IDENTITY = [0.7, 0.5, 0.65, float("nan"), 0.9, 0.6]  # NaN: a category VSM leaves out; 0.6 is not above 0.6
DIVERSITY = [0.2, 0.9, 0.4, 0.8, 0.6, 1.0]


def test_consistency_ratio_and_diversity_over_consistency_on_known_inputs():
    assert consistency_ratio(torch.tensor(IDENTITY), 0.6).item() == pytest.approx(3 / 5)
    assert diversity_over_consistency(torch.tensor(DIVERSITY), torch.tensor(IDENTITY), 0.6).item() == pytest.approx(0.4)
    assert math.isnan(diversity_over_consistency(torch.tensor([0.5]), torch.tensor([0.1]), 0.6).item())
    assert math.isnan(consistency_ratio(torch.tensor([float("nan")]), 0.6).item())


def test_the_torchmetrics_metric_accumulates_groups_like_one_batch():
    metric = ConsistencyDiversity(0.6)
    metric.update(torch.tensor(IDENTITY[:4]), torch.tensor(DIVERSITY[:4]))
    metric.update(torch.tensor(IDENTITY[4:]), torch.tensor(DIVERSITY[4:]))
    out = metric.compute()
    assert out["consistency_ratio"].item() == pytest.approx(3 / 5)
    assert out["diversity_over_consistency"].item() == pytest.approx(0.4)
    assert (out["consistent"].item(), out["samples"].item()) == (3, 5)


def test_summarize_gives_overall_and_per_category_means():
    rows = [
        {"category": "object", "vsm": 0.7, "mtg_nssm": 0.2},
        {"category": "object", "vsm": 0.5, "mtg_nssm": 0.9},
        {"category": "style", "vsm": None, "mtg_nssm": None},  # left out of VSM and MTG-nSSM
        {"category": "animal", "vsm": 0.9, "mtg_nssm": 0.6},
    ]
    out = summarize(rows, ["vsm", "mtg_nssm"], identity="vsm", diversity="mtg_nssm", threshold=0.6)
    overall = out["overall"]
    assert overall["samples"] == 4 and overall["vsm_n"] == 3
    assert overall["vsm"] == pytest.approx(0.7) and overall["mtg_nssm"] == pytest.approx(1.7 / 3)
    assert overall["consistency_ratio"] == pytest.approx(2 / 3)
    assert overall["diversity_over_consistency"] == pytest.approx(0.4)
    assert out["by_category"]["style"]["vsm"] is None and out["by_category"]["style"]["consistency_ratio"] is None
    assert out["by_category"]["object"]["vsm"] == pytest.approx(0.6)
    json.dumps(out)  # plain JSON: no tensors, no NaN


# -------------------------------------------------------------------------------------------------------- segmenter


def test_background_segmenter_finds_the_subject_on_a_plain_background():
    image = torch.full((1, 3, 40, 40), 0.5)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    disc = (yy - 15) ** 2 + (xx - 22) ** 2 <= 64
    image[0, :, disc] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    assert torch.equal(BackgroundSegmenter()(image)[0] > 0.5, disc)


# --------------------------------------------------------------------------------------------------- CLIP and DINO


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from divrl.policy.tiny import tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(77)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=0,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": {"height": 32, "width": 32}, "image_mean": mean, "image_std": std})
    )
    return folder, model, tokenizer, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def test_clip_embedder_loads_the_saved_model_and_matches_direct_calls(tiny_clip):
    folder, model, tokenizer, mean, std = tiny_clip
    clip = CLIPEmbedder(str(folder), local_files_only=True)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        direct = model.get_image_features(pixel_values=(images - mean) / std)
        direct = getattr(direct, "pooler_output", direct)
        tokens = tokenizer(
            ["a red star", "a blue disc on the left"], padding="max_length", max_length=77, return_tensors="pt"
        )
        text = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        text = getattr(text, "pooler_output", text)
    assert torch.allclose(clip.embed_images(images), F.normalize(direct, dim=-1), atol=1e-5)
    assert torch.allclose(
        clip.embed_texts(["a red star", "a blue disc on the left"]), F.normalize(text, dim=-1), atol=1e-5
    )


def test_clip_preprocessing_resizes_the_short_side_and_centre_crops(tiny_clip):
    clip = CLIPEmbedder(str(tiny_clip[0]), local_files_only=True)
    wide = torch.zeros(1, 3, 64, 128)
    wide[..., 32:96] = 1.0  # a white centre square on a wide black image
    pixels = clip.preprocess(wide) * clip.image_std + clip.image_mean  # undo the normalisation
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels[..., 2:-2, 2:-2].min() > 0.99  # the crop is the white centre


def test_clip_embedder_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPEmbedder(str(tmp_path / "nope"), local_files_only=True)


def test_dino_embedding_is_the_normalised_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from divrl.rewards.backbones import DINOv2Backbone

    torch.manual_seed(0)
    model = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            patch_size=4,
            image_size=16,
        )
    ).eval()
    model.save_pretrained(tmp_path)
    dino = DINOv2Backbone(str(tmp_path), grid_size=4, local_files_only=True)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        hidden = model(pixel_values=(images - dino.image_mean) / dino.image_std).last_hidden_state
    assert torch.allclose(dino.embed(images), hidden[:, 0], atol=1e-5)


# ------------------------------------------------------------------------------------------------------------ suite


def test_suite_scores_a_copy_a_pose_change_and_a_recolouring(tmp_path):
    from divrl.data.synthetic import Pose, SubjectIdentity, render

    subject = SubjectIdentity("triangle", ("red", "yellow"), "stripes")
    ref, ref_mask = render(subject, Pose(0.5, 0.5, 0.35, 0.0), size=96)
    moved, _ = render(subject, Pose(0.3, 0.65, 0.2, 1.2), size=96)
    recoloured, _ = render(SubjectIdentity("triangle", ("blue", "green"), "stripes"), Pose(0.5, 0.5, 0.35, 0.0), 96)
    backbone = DenseDescriptor(grid_size=24, cell=4)
    suite = EvalSuite(identity=FeatureScorer(backbone, pool=1), sdino=backbone, segmenter=BackgroundSegmenter())
    assert suite.columns == ["vsm", "si_iou", "mtg_nssm", "sdino"]
    out = suite.score_group(ref, torch.stack([ref, moved, recoloured]), "a striped triangle", ref_mask, "object")
    copy, pose, colour = zip(*(out[c] for c in ("vsm", "si_iou", "mtg_nssm")), strict=True)
    assert copy[1] == pytest.approx(1.0) and copy[2] == pytest.approx(0.0, abs=1e-6)  # a copy: same pose
    assert pose[1] < 0.9 and pose[2] > 0.3 and pose[0] > 0.5  # a new pose: diverse, still the subject
    assert colour[1] == pytest.approx(1.0) and colour[0] < 0.2  # recoloured: same pose, identity lost
    style = suite.score_group(ref, torch.stack([ref, moved]), "a striped triangle", ref_mask, "style")
    assert style["vsm"] == [None, None] and style["mtg_nssm"] == [None, None] and style["si_iou"][0] is not None


def test_any_reward_is_a_column_with_the_conditions_prompt_and_metadata():
    from divrl.data.stream import ConditionSample
    from divrl.data.synthetic import Pose, SubjectIdentity, render
    from divrl.rewards import CallableReward, GatedReward, NonFiniteReward

    subject = SubjectIdentity("star", ("red", "yellow"), "stripes")
    ref, mask = render(subject, Pose(0.5, 0.5, 0.3, 0.0), size=96)
    images = torch.stack([ref, render(subject, Pose(0.3, 0.6, 0.2, 1.0), size=96)[0]])
    scorer = FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=1)
    seen = []

    def length(images, prompts, metadata):
        seen.append((prompts, metadata[0]["source"]))
        return [len(p) for p in prompts]

    def broken(images, prompts, metadata):
        raise NonFiniteReward("nan")

    suite = EvalSuite(
        identity=scorer,
        rewards={"r2": GatedReward(scorer), "length": CallableReward(length), "broken": CallableReward(broken)},
    )
    assert suite.columns == ["vsm", "mtg_nssm", "r2", "length", "broken"] and suite.header("r2") == "r2 ↑"
    assert suite.describe()["r2"].startswith("GatedReward")
    sample = ConditionSample("star", "a star", [ref], [mask], "object", {"source": "synthetic"})
    out = suite.score_group(ref, images, "a star", mask, "object", sample=sample)
    assert out["r2"] == pytest.approx(GatedReward(scorer)(ref, images, ref_mask=mask).reward.tolist())
    assert out["length"] == [6.0, 6.0] and seen == [(["a star", "a star"], "synthetic")]
    assert out["broken"] == [None, None]  # not finite: empty cells, never 0
    with pytest.raises(ValueError, match=r"names of built-in columns"):
        EvalSuite(identity=scorer, rewards={"vsm": GatedReward(scorer)})


def test_suite_refuses_a_trade_off_column_no_model_computes():
    with pytest.raises(ValueError, match="consistency_metric is 'vsm' but no model computes"):
        EvalSuite(sdino=DenseDescriptor())


def test_suite_wires_clip_dino_and_hps_to_their_columns(tiny_clip, tmp_path, monkeypatch):
    import sys
    import types

    from transformers import Dinov2Config, Dinov2Model

    from divrl.eval import HPSv2
    from divrl.rewards.backbones import DINOv2Backbone

    calls = []

    def fake_score(images, prompt, hps_version):  # the hpsv2 package's API: PIL images and one prompt
        calls.append((len(images), images[0].size, prompt, hps_version))
        return [0.25 + 0.01 * k for k in range(len(images))]

    monkeypatch.setitem(sys.modules, "hpsv2", types.SimpleNamespace(score=fake_score))
    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            patch_size=4,
            image_size=16,
        )
    ).save_pretrained(tmp_path)
    clip = CLIPEmbedder(str(tiny_clip[0]), local_files_only=True)
    dino = DINOv2Backbone(str(tmp_path), grid_size=4, local_files_only=True)
    suite = EvalSuite(
        clip=clip,
        dino=dino,
        sdino=dino,
        hps=HPSv2(),
        consistency_metric="sdino",
        consistency_threshold=0.75,
        diversity_metric="clip_i",
    )
    assert suite.columns == ["clip_t", "clip_i", "dino", "hps", "sdino"]
    g = torch.Generator().manual_seed(3)
    reference, images = torch.rand(3, 48, 48, generator=g), torch.rand(3, 3, 40, 40, generator=g)
    out = suite.score_group(reference, images, "a red star")
    gen_emb = clip.embed_images(images)
    assert out["clip_t"] == pytest.approx(cosine(gen_emb, clip.embed_texts(["a red star"])).tolist(), abs=1e-6)
    assert out["clip_i"] == pytest.approx(cosine(gen_emb, clip.embed_images(reference)).tolist(), abs=1e-6)
    assert out["dino"] == pytest.approx(cosine(dino.embed(images), dino.embed(reference)).tolist(), abs=1e-6)
    assert out["sdino"] == pytest.approx(
        patch_similarity(dino(images).visual, dino(reference).visual).tolist(), abs=1e-6
    )
    assert out["hps"] == pytest.approx([0.25, 0.26, 0.27]) and calls == [(3, (40, 40), "a red star", "v2.1")]


def test_hps_without_the_package_says_how_to_get_it(monkeypatch):
    import sys

    from divrl.eval import HPSv2

    monkeypatch.setitem(sys.modules, "hpsv2", None)  # import fails
    with pytest.raises(ImportError, match="pip install hpsv2"):
        HPSv2()


def test_the_trade_off_metric_computes_after_a_sync_across_processes():
    def two_ranks(tensor, group=None):  # what a 2-process all-gather returns: this rank's state and the other's
        return [tensor, tensor.clone()]

    metric = ConsistencyDiversity(0.6, dist_sync_fn=two_ranks, distributed_available_fn=lambda: True)
    metric.update(torch.tensor(IDENTITY), torch.tensor(DIVERSITY))
    out = metric.compute()
    assert (out["consistent"].item(), out["samples"].item()) == (6, 10)
    assert out["consistency_ratio"].item() == pytest.approx(3 / 5)
    assert out["diversity_over_consistency"].item() == pytest.approx(0.4)


def test_a_reference_with_an_empty_mask_leaves_its_masked_columns_out_instead_of_stopping(caplog):
    from divrl.data.synthetic import Pose, SubjectIdentity, render

    ref, _ = render(SubjectIdentity("disc", ("red", "blue"), "dots"), Pose(), size=96)
    backbone = DenseDescriptor(grid_size=24, cell=4)
    suite = EvalSuite(identity=FeatureScorer(backbone, pool=1), sdino=backbone, segmenter=BackgroundSegmenter())
    with caplog.at_level("WARNING"):
        out = suite.score_group(ref, torch.stack([ref, ref]), "a dotted disc", torch.zeros(96, 96), "object")
    assert out["vsm"] == out["mtg_nssm"] == out["si_iou"] == [None, None]
    assert out["sdino"][0] == pytest.approx(1.0, abs=1e-5) and "mask is empty or tiny" in caplog.text

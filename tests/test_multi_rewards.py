"""Multi-subject rewards on constructed images: two known subjects pasted at known boxes on a plain background.

The embedder in most tests is the crop's mean colour, so every cosine is computed by hand from the pasted colours.
"""

from __future__ import annotations

import math

import pytest
import torch

from divrl.data.stream import ConditionSample
from divrl.rewards import FeatureScorer, Group, GroupScorer, NonFiniteReward
from divrl.rewards import functional as RF
from divrl.rewards.backbones import DenseDescriptor
from divrl.rewards.embedders import BackboneEmbedder, Embedder
from divrl.rewards.multi import PairwiseSubjectConsistency, PerSubjectDivRL
from divrl.rewards.subjects import CallableDetector, PlainBackgroundDetector, SubjectLocator, crop, subject_words

RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)
RED_2, BLUE_2 = (0.8, 0.25, 0.1), (0.2, 0.2, 0.8)  # the generated subjects: a little off their references


class MeanColour(Embedder):
    """A crop's mean RGB: cosines are the hand-computable cosines of colours."""

    def embed(self, crops):
        return torch.stack([c.reshape(3, -1).mean(1) for c in crops])


def canvas(*subjects, size=64):
    """A white image with ``(colour, (x0, y0, x1, y1))`` rectangles pasted on it."""
    image = torch.ones(3, size, size)
    for colour, (x0, y0, x1, y1) in subjects:
        image[:, y0:y1, x0:x1] = torch.tensor(colour)[:, None, None]
    return image


def striped(image, colours, box, period=4, vertical=False):
    """Paste ``box`` with stripes of two colours (``period`` pixels each): a subject with texture for nSSM / VSM."""
    x0, y0, x1, y1 = box
    for i in range(y0, y1) if not vertical else range(x0, x1):
        colour = torch.tensor(colours[(i // period) % 2])[:, None]
        if vertical:
            image[:, y0:y1, i] = colour
        else:
            image[:, i, x0:x1] = colour
    return image


YELLOW, GREEN = (0.95, 0.85, 0.15), (0.15, 0.7, 0.25)


def textured(*subjects):
    """Subject 1 red/yellow horizontal stripes, subject 2 blue/green vertical stripes, at the given boxes."""
    image = torch.ones(3, 64, 64)
    for which, box in subjects:
        striped(image, [(RED, YELLOW), (BLUE, GREEN)][which], box, vertical=which == 1)
    return image


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def group(*images, words=("square", "disc"), masks=None, references=None):
    references = references or [canvas((RED, (20, 22, 44, 42))), canvas((BLUE, (16, 16, 48, 48)))]
    sample = ConditionSample(
        "pair/0", "the red square and the blue disc", references, masks, metadata={"subjects": list(words)}
    )
    return Group(sample, torch.stack(images))


LEFT, RIGHT = (4, 10, 24, 40), (34, 20, 60, 50)
PAIR = canvas((RED_2, LEFT), (BLUE_2, RIGHT))
SWAPPED = canvas((BLUE_2, LEFT), (RED_2, RIGHT))
ALONE = canvas((RED_2, LEFT))


def psr(assignment="order", **kwargs):
    embedder = MeanColour()
    locator = SubjectLocator(PlainBackgroundDetector(), assignment, embedder if assignment == "hungarian" else None)
    return PairwiseSubjectConsistency(locator, embedder, **kwargs)


def test_plain_background_detector_finds_the_pasted_boxes_left_to_right():
    boxes = PlainBackgroundDetector()(torch.stack([PAIR, SWAPPED, ALONE, torch.ones(3, 64, 64)]), "anything")
    assert [b.tolist() for b in boxes] == [[list(LEFT), list(RIGHT)]] * 2 + [[list(LEFT)], []]


def test_cosines_are_those_of_the_pasted_colours():
    out = psr()(group(PAIR))
    assert out.components["sc_1"].item() == pytest.approx(cos(RED_2, RED), abs=1e-6)
    assert out.components["sc_2"].item() == pytest.approx(cos(BLUE_2, BLUE), abs=1e-6)
    assert out.reward.item() == pytest.approx((cos(RED_2, RED) + cos(BLUE_2, BLUE)) / 2, abs=1e-6)
    assert out.components["found"].item() == 1.0


def test_swapped_subjects_score_low_in_order_and_are_recovered_by_hungarian():
    order = psr("order")(group(PAIR, SWAPPED))
    swapped = (cos(BLUE_2, RED) + cos(RED_2, BLUE)) / 2
    assert order.reward[1].item() == pytest.approx(swapped, abs=1e-6)
    assert order.reward[1] < order.reward[0] - 0.3
    hungarian = psr("hungarian")(group(PAIR, SWAPPED))
    assert torch.allclose(hungarian.reward, order.reward[[0, 0]], atol=1e-6)
    assert hungarian.components["sc_1"][1].item() == pytest.approx(cos(RED_2, RED), abs=1e-6)


def test_a_missing_subject_is_counted_and_scored_as_configured():
    whole = psr()(group(ALONE))
    assert whole.components["found"].item() == 0.5
    assert whole.components["found_1"].item() == 1.0 and whole.components["found_2"].item() == 0.0
    mean = ALONE.reshape(3, -1).mean(1).tolist()  # PSR's fallback: the whole image
    assert whole.components["sc_2"].item() == pytest.approx(cos(mean, BLUE), abs=1e-6)
    scored = psr(on_missing="score", missing_score=-1.0)(group(ALONE))
    assert scored.components["sc_2"].item() == -1.0
    assert scored.reward.item() == pytest.approx((cos(RED_2, RED) - 1.0) / 2, abs=1e-6)
    hungarian = psr("hungarian", on_missing="score")(group(ALONE))  # one box, two subjects: the red one matches
    assert hungarian.components["sc_1"].item() == pytest.approx(cos(RED_2, RED), abs=1e-6)
    assert hungarian.components["sc_2"].item() == -1.0 and hungarian.components["found"].item() == 0.5


def test_psr_order_gives_two_subjects_of_one_word_boxes_zero_and_one():
    first, second = (0.0, 0.0, 32.0, 32.0), (32.0, 32.0, 64.0, 64.0)
    seen = []

    def detector(images, word):  # a class-aware detector: boxes best first, per word
        seen.append(word)
        return [torch.tensor([first, second])] * images.shape[0]

    image = canvas((RED_2, (0, 0, 32, 32)), (BLUE_2, (32, 32, 64, 64)))
    out = PairwiseSubjectConsistency(SubjectLocator(CallableDetector(detector), reference_crop="whole"), MeanColour())
    result = out(group(image, words=("dog", "dog")))
    whole_red, whole_blue = (
        canvas((RED, (20, 22, 44, 42))).reshape(3, -1).mean(1).tolist(),
        canvas((BLUE, (16, 16, 48, 48))).reshape(3, -1).mean(1).tolist(),
    )
    assert result.components["sc_1"].item() == pytest.approx(cos(RED_2, whole_red), abs=1e-6)
    assert result.components["sc_2"].item() == pytest.approx(cos(BLUE_2, whole_blue), abs=1e-6)
    assert seen == ["dog"]  # one detection call per distinct word, over the whole group


def test_reference_crop_from_mask_detection_or_whole():
    mask = torch.zeros(64, 64)
    mask[30:40, 30:40] = 1  # deliberately not the painted box: the mask wins under `auto`
    locator = SubjectLocator(PlainBackgroundDetector())
    g = group(PAIR, masks=[mask, None])
    _, boxes, found = locator.references(g.references, g.masks, ["a", "b"])
    assert boxes[0].tolist() == [30, 30, 40, 40] and boxes[1].tolist() == [16, 16, 48, 48] and found.all()
    _, boxes, _ = SubjectLocator(PlainBackgroundDetector(), reference_crop="detect").references(
        g.references, g.masks, ["a", "b"]
    )
    assert boxes[0].tolist() == [20, 22, 44, 42]
    _, boxes, _ = SubjectLocator(PlainBackgroundDetector(), reference_crop="whole").references(
        g.references, g.masks, ["a", "b"]
    )
    assert boxes[0].tolist() == [0, 0, 64, 64]


def test_subject_words_need_one_word_per_reference():
    sample = group(PAIR).sample
    assert subject_words(sample) == ["square", "disc"]
    sample.metadata["subjects"] = ["square"]
    with pytest.raises(ValueError, match="one category word per reference"):
        subject_words(sample)
    del sample.metadata["subjects"]
    with pytest.raises(ValueError, match="'subjects'"):
        subject_words(sample)
    assert subject_words(sample, class_agnostic=True) == ["object", "object"]
    single = ConditionSample("dog", "a dog", [PAIR], metadata={"class": "dog"})
    assert subject_words(single) == ["dog"]


def test_bad_detector_output_is_refused_with_the_detector_named():
    bad = CallableDetector(lambda images, word: [torch.tensor([[0.0, 0.0, float("nan"), 1.0]])])
    with pytest.raises(ValueError, match="CallableDetector.detect returned boxes"):
        bad(PAIR[None], "dog")
    short = CallableDetector(lambda images, word: [])
    with pytest.raises(ValueError, match="one .n, 4. tensor of boxes per image"):
        short(PAIR[None], "dog")


def _scorer():
    return FeatureScorer(DenseDescriptor(grid_size=8, cell=4), pool=1)


def test_per_subject_divrl_equals_the_scorer_on_each_subject_crop():
    scorer = _scorer()
    reward = PerSubjectDivRL(
        SubjectLocator(PlainBackgroundDetector(), reference_crop="detect"),
        scorer,
        gate=True,
        threshold=0.5,
        weight=5.0,
        crop_size=32,
    )
    references = [textured((0, (20, 22, 44, 42))), textured((1, (16, 16, 48, 48)))]
    g = group(textured((0, LEFT), (1, RIGHT)), textured((1, LEFT), (0, RIGHT)), references=references)
    out = reward(g)

    def size(t):
        return torch.nn.functional.interpolate(t[None], size=(32, 32), mode="bilinear", antialias=True)

    expected_nssm, expected_vsm = [], []
    for k, (ref_box, gen_boxes) in enumerate([((20, 22, 44, 42), (LEFT, LEFT)), ((16, 16, 48, 48), (RIGHT, RIGHT))]):
        ref = size(crop(g.references[k], torch.tensor(ref_box, dtype=torch.float32)))
        gen = torch.cat(
            [size(crop(g.images[n], torch.tensor(b, dtype=torch.float32))) for n, b in enumerate(gen_boxes)]
        )
        parts = scorer.score_group(ref, gen)
        expected_nssm.append(parts.nssm)
        expected_vsm.append(parts.vsm)
    nssm, vsm = torch.stack(expected_nssm, 1), torch.stack(expected_vsm, 1)
    assert torch.allclose(out.components["nssm_1"], nssm[:, 0]) and torch.allclose(out.components["vsm_2"], vsm[:, 1])
    assert torch.allclose(out.reward, RF.gated_reward(nssm, vsm, 0.5, 5.0).mean(1))
    assert torch.equal(out.gated, (vsm < 0.5).any(1))
    # the swapped image puts the wrong colour in each subject's box: identity fails the gate there, not in the pair
    assert out.gated.tolist() == [False, True]
    assert (out.components["vsm_1"][1] < 0.5) and (out.components["vsm_1"][0] >= 0.5)


def test_per_subject_divrl_with_any_group_scorer_scores_each_subject_alone():
    class Remote(GroupScorer):  # a scorer without a local backbone (a reward server): one call per subject
        calls = 0

        def score_group(self, reference, images, ref_mask=None, gen_masks=None, **kwargs):
            Remote.calls += 1
            return _scorer().score_group(reference, images, ref_mask, gen_masks, **kwargs)

    references = [textured((0, (20, 22, 44, 42))), textured((1, (16, 16, 48, 48)))]
    g = group(textured((0, LEFT), (1, RIGHT)), textured((1, LEFT), (0, RIGHT)), references=references)
    locator = SubjectLocator(PlainBackgroundDetector())
    remote = PerSubjectDivRL(locator, Remote(), crop_size=32)(g)
    local = PerSubjectDivRL(locator, _scorer(), crop_size=32)(g)
    assert Remote.calls == 2 and torch.equal(remote.reward, local.reward)


def test_per_subject_stage_one_is_the_mean_nssm_and_a_missing_subject_fails_its_gate():
    locator = SubjectLocator(PlainBackgroundDetector())
    references = [textured((0, (20, 22, 44, 42))), textured((1, (16, 16, 48, 48)))]
    explore = PerSubjectDivRL(locator, _scorer(), gate=False, crop_size=32)(
        group(textured((0, LEFT), (1, RIGHT)), references=references)
    )
    assert explore.components["nssm_1"] > 0.05 and explore.components["nssm_2"] > 0.05
    assert explore.reward.item() == pytest.approx(
        (explore.components["nssm_1"] + explore.components["nssm_2"]).item() / 2
    )
    assert not explore.gated.any()
    missing = PerSubjectDivRL(locator, _scorer(), gate=True, crop_size=32, on_missing="score")(
        group(textured((0, LEFT)), references=references)
    )
    assert missing.components["vsm_2"].item() == 0.0 and missing.components["nssm_2"].item() == 0.0
    assert missing.gated.item() and missing.components["found"].item() == 0.5
    expected = (RF.gated_reward(missing.components["nssm_1"], missing.components["vsm_1"]) - 5 * 0.25) / 2
    assert missing.reward.item() == pytest.approx(expected.item(), abs=1e-6)


def test_per_subject_non_finite_scores_are_skipped_not_rewarded():
    class Broken(FeatureScorer):
        def score_features(self, *args, **kwargs):
            out = super().score_features(*args, **kwargs)
            return out._replace(vsm=out.vsm * float("nan"))

    reward = PerSubjectDivRL(SubjectLocator(PlainBackgroundDetector()), Broken(DenseDescriptor(grid_size=8, cell=4)))
    with pytest.raises(NonFiniteReward, match="subject 1 \\('square'\\)"):
        reward(group(PAIR))


def test_backbone_embedder_is_the_normalised_mean_of_the_grid():
    backbone = DenseDescriptor(grid_size=8, cell=4)
    embedder = BackboneEmbedder(backbone, size=32)
    crops = [PAIR[:, :20, :30], SWAPPED]
    out = embedder(crops)
    resized = torch.cat(
        [torch.nn.functional.interpolate(c[None], size=(32, 32), mode="bilinear", antialias=True) for c in crops]
    )
    expected = torch.nn.functional.normalize(backbone(resized).visual.mean(dim=(-2, -1)), dim=-1)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(out.norm(dim=-1), torch.ones(2))


class ColourAndSquare(Embedder):
    """Another feature space (6-D): the crop's mean colour and mean squared colour."""

    def embed(self, crops):
        return torch.stack([torch.cat([c.reshape(3, -1).mean(1), c.reshape(3, -1).square().mean(1)]) for c in crops])


def feature(colour):
    return list(colour) + [c * c for c in colour]


def test_hungarian_matches_in_the_locators_space_and_scores_in_the_rewards():
    locator = SubjectLocator(PlainBackgroundDetector(), "hungarian", MeanColour())
    out = PairwiseSubjectConsistency(locator, ColourAndSquare())(group(PAIR, SWAPPED))
    for n in range(2):  # matched by colour, so the swap is undone; scored in the 6-D space
        assert out.components["sc_1"][n].item() == pytest.approx(cos(feature(RED_2), feature(RED)), abs=1e-6)
        assert out.components["sc_2"][n].item() == pytest.approx(cos(feature(BLUE_2), feature(BLUE)), abs=1e-6)
    assert PairwiseSubjectConsistency(locator).embedder is locator.embedder  # no embedder: the locator's


def test_a_subject_missing_from_its_reference_is_counted_and_cropped_whole(caplog):
    references = [canvas((RED, (20, 22, 44, 42))), torch.ones(3, 64, 64)]  # reference 2 shows nothing
    with caplog.at_level("WARNING"):
        out = psr()(group(PAIR, references=references))
    assert out.components["ref_found"].item() == 0.5 and out.components["found"].item() == 1.0
    assert out.components["sc_2"].item() == pytest.approx(cos(BLUE_2, (1.0, 1.0, 1.0)), abs=1e-6)
    assert "subject 2 ('disc') not found in its reference" in caplog.text


def test_boxes_without_area_are_dropped_and_malformed_output_refused():
    flat = CallableDetector(lambda images, word: [torch.tensor([[5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 3.0, 3.0]])])
    assert flat(PAIR[None], "dog")[0].tolist() == [[1.0, 1.0, 3.0, 3.0]]
    one = CallableDetector(lambda images, word: [[1, 2, 3, 4]])
    assert one(PAIR[None], "dog")[0].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    wide = CallableDetector(lambda images, word: [torch.zeros(1, 8)])
    with pytest.raises(ValueError, match="CallableDetector.detect returned boxes"):
        wide(PAIR[None], "dog")


def test_crop_truncates_coordinates_as_psr():
    image = torch.arange(100.0).reshape(1, 10, 10)
    assert torch.equal(crop(image, torch.tensor([1.7, 2.2, 4.9, 5.99])), image[:, 2:5, 1:4])
    assert crop(image, torch.tensor([9.5, 9.5, 9.9, 9.9])).shape == (1, 1, 1)  # at least one pixel


def test_per_subject_divrl_crops_the_reference_mask_with_its_reference():
    scorer = _scorer()
    references = [textured((0, (20, 22, 44, 42))), textured((1, (16, 16, 48, 48)))]
    mask = torch.zeros(64, 64)
    mask[22:42, 20:32] = 1  # the left half of subject 1 only
    g = group(textured((0, LEFT), (1, RIGHT)), references=references, masks=[mask, None])
    out = PerSubjectDivRL(SubjectLocator(PlainBackgroundDetector(), reference_crop="detect"), scorer, crop_size=32)(g)

    def size(t):
        return torch.nn.functional.interpolate(t[None], size=(32, 32), mode="bilinear", antialias=True)

    box = torch.tensor([20.0, 22.0, 44.0, 42.0])
    ref_mask = torch.nn.functional.interpolate(crop(mask[None], box)[None], size=(32, 32), mode="bilinear")[0, 0]
    expected = scorer.score_group(
        size(crop(references[0], box)), size(crop(g.images[0], torch.tensor(LEFT).float())), ref_mask
    )
    unmasked = scorer.score_group(size(crop(references[0], box)), size(crop(g.images[0], torch.tensor(LEFT).float())))
    assert out.components["nssm_1"].item() == pytest.approx(expected.nssm.item(), abs=1e-6)
    assert out.components["vsm_1"].item() == pytest.approx(expected.vsm.item(), abs=1e-6)
    assert expected.nssm.item() != pytest.approx(unmasked.nssm.item(), abs=1e-3)  # the mask mattered
    bad = group(PAIR, masks=[torch.zeros(32, 32), None])
    with pytest.raises(ValueError, match="mask 0 has size"):
        PerSubjectDivRL(SubjectLocator(PlainBackgroundDetector()), scorer)(bad)


def test_an_evaluation_is_rescored_when_any_subject_setting_changes():
    from divrl.eval.suite import _describe

    embedder = MeanColour()
    base = _describe(PairwiseSubjectConsistency(SubjectLocator(PlainBackgroundDetector(), "order"), embedder))
    for other in (
        SubjectLocator(PlainBackgroundDetector(), "hungarian", embedder),
        SubjectLocator(PlainBackgroundDetector(threshold=0.3), "order"),
        SubjectLocator(PlainBackgroundDetector(), "order", reference_crop="detect"),
    ):
        assert _describe(PairwiseSubjectConsistency(other, embedder)) != base
    assert (
        _describe(
            PairwiseSubjectConsistency(SubjectLocator(PlainBackgroundDetector(), "order"), embedder, on_missing="score")
        )
        != base
    )


def test_reference_boxes_are_cached_by_content_not_by_id():
    reward = psr()
    a = [canvas((RED, (20, 22, 44, 42))), canvas((BLUE, (16, 16, 48, 48)))]
    b = [canvas((RED, (2, 2, 20, 20))), canvas((BLUE, (40, 40, 60, 60)))]  # the same colours elsewhere
    first = reward(group(PAIR, references=a))
    second = reward(group(PAIR, references=b))  # the same condition id, other pictures
    fresh = psr()(group(PAIR, references=b))
    assert torch.equal(second.reward, fresh.reward) and torch.equal(first.reward, second.reward)
    _, boxes, _ = reward.locator.references(b, [None, None], ["square", "disc"], "pair/0")
    assert boxes[0].tolist() == [2, 2, 20, 20] and len(reward.locator._reference_boxes) == 4


def test_ragged_detector_output_names_the_detector():
    ragged = CallableDetector(lambda images, word: [[[1, 2, 3], [1, 2, 3, 4]]])
    with pytest.raises(ValueError, match="CallableDetector.detect returned"):
        ragged(PAIR[None], "dog")

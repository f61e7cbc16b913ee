"""Property tests on real photos (../shared/datasets/dreambooth) with the weight-free backbone.

Averaged over the 30 subjects, nSSM must rank structure changes (another photo of the subject in another pose,
the mirror image) far above a colour change of the same photo (colour jitter keeps the layout).
"""

import torch
import torch.nn.functional as F
from conftest import colour_jitter

from divrl.images import to_image_batch
from divrl.rewards import FeatureScorer, NSSMReward
from divrl.rewards.backbones import DenseDescriptor


def load_square(path, size=384):
    return F.interpolate(to_image_batch(path), size=(size, size), mode="bilinear", antialias=True)


def test_nssm_ranks_pose_and_mirror_above_colour_jitter(dreambooth_root):
    reward = NSSMReward(FeatureScorer(DenseDescriptor(), pool=2), track_vsm=False)
    generator = torch.Generator().manual_seed(0)
    scores = {"pose": [], "mirror": [], "jitter": []}
    subjects = sorted(p for p in dreambooth_root.iterdir() if p.is_dir())
    assert len(subjects) == 30
    for subject in subjects:
        photos = sorted(subject.glob("*.jpg"))
        reference = load_square(photos[0])
        variants = torch.cat([load_square(photos[1]), reference.flip(-1), colour_jitter(reference, generator)])
        out = reward(reference, variants).components["nssm"]
        for name, value in zip(scores, out):
            scores[name].append(value.item())
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    print(
        f"\nDreamBooth nSSM means (30 subjects, dense descriptor, pool 2): pose {mean['pose']:.3f}, "
        f"mirror {mean['mirror']:.3f}, colour jitter {mean['jitter']:.3f}; margins "
        f"{mean['pose'] - mean['jitter']:.3f} and {mean['mirror'] - mean['jitter']:.3f}"
    )
    assert mean["pose"] > mean["jitter"] + 0.3
    assert mean["mirror"] > mean["jitter"] + 0.3
    # and subject by subject, not just on average
    assert sum(p > j for p, j in zip(scores["pose"], scores["jitter"])) >= 27
    assert sum(m > j for m, j in zip(scores["mirror"], scores["jitter"])) >= 27

"""Group reward scoring vs the published per-image server loop, measured side by side.

One group = one reference and G = 21 generated images (the paper's group size), scored with DivRL's stage-2
reward R2 (needs nSSM and VSM) on 48x48 feature grids. Three ways:

  group      divrl's GatedReward: the reference is encoded once, the 21 images in one batch, nSSM and VSM share
             the features, and the reference SSM / normalised grids are computed once.
  per-image  a loop over the 21 images that re-encodes the reference for every image (one image per call),
             computing nSSM and VSM from the same features.
  server     how the published reward server is driven: one request per image *and per component*
             (is_ssm true, then false), each re-encoding the reference and the image.

Run:  python benchmarks/rewards.py [--backbone dense|dinov2-small] [--repeats 3] [--threads N]

``dinov2-small`` builds DINOv2-small from its published configuration with random weights (no download): the
speed is that of the real model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from divrl.rewards import FeatureScorer, GatedReward
from divrl.rewards import functional as RF
from divrl.rewards.backbones import DenseDescriptor


def build_backbone(name: str):
    if name == "dense":
        return DenseDescriptor(grid_size=48)
    from transformers import Dinov2Config, Dinov2Model

    from divrl.rewards.backbones import DINOv2Backbone

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)
    return DINOv2Backbone.from_model(Dinov2Model(config).eval(), grid_size=48)


def per_image(backbone, reference, images, pool, tau_s, tau_v, threshold, weight):
    rewards = []
    for image in images:
        ref, gen = backbone(reference), backbone(image[None])
        n = RF.nssm(gen.visual, ref.visual, pool=pool)
        v = RF.vsm(gen.semantic, gen.visual, ref.semantic, ref.visual, tau_s=tau_s, tau_v=tau_v)
        rewards.append(RF.gated_reward(n, v, threshold, weight))
    return torch.cat(rewards)


def server_style(backbone, reference, images, pool, tau_s, tau_v, threshold, weight):
    rewards = []
    for image in images:
        ref, gen = backbone(reference), backbone(image[None])  # request 1: is_ssm = true
        n = RF.nssm(gen.visual, ref.visual, pool=pool)
        ref, gen = backbone(reference), backbone(image[None])  # request 2: is_ssm = false
        v = RF.vsm(gen.semantic, gen.visual, ref.semantic, ref.visual, tau_s=tau_s, tau_v=tau_v)
        rewards.append(RF.gated_reward(n, v, threshold, weight))
    return torch.cat(rewards)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["dense", "dinov2-small"], default="dense")
    parser.add_argument("--group-size", type=int, default=21)
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (the paper trains at 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the reward math and the backbone run there)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = build_backbone(args.backbone).to(args.device)
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(1, 3, args.resolution, args.resolution, generator=gen)
    images = (reference + 0.3 * torch.randn(args.group_size, 3, args.resolution, args.resolution, generator=gen)).clamp(
        0, 1
    )
    reference, images = reference.to(args.device), images.to(args.device)
    params = dict(pool=2, tau_s=0.7, tau_v=0.7, threshold=0.5, weight=5.0)
    reward = GatedReward(FeatureScorer(backbone, pool=2, tau_s=0.7, tau_v=0.7), threshold=0.5, weight=5.0)

    reward(reference, images[:2])  # warm-up
    t_group, r_group = timed(lambda: reward(reference, images).reward, args.repeats)
    t_loop, r_loop = timed(lambda: per_image(backbone, reference, images, **params), args.repeats)
    t_server, r_server = timed(lambda: server_style(backbone, reference, images, **params), args.repeats)
    r_loop, r_server = r_loop.cpu(), r_server.cpu()
    assert torch.allclose(r_group, r_loop, atol=1e-4) and torch.allclose(r_group, r_server, atol=1e-4), "results differ"

    print(
        f"R2 on one group: G={args.group_size}, {args.resolution}x{args.resolution} images, 48x48 grids, "
        f"backbone={args.backbone}, device={args.device}, torch threads={torch.get_num_threads()}, "
        f"median of {args.repeats}"
    )
    print(f"  group module (reference once, batched):        {t_group:8.3f} s")
    print(
        f"  per-image loop (reference re-encoded):         {t_loop:8.3f} s   -> group is {t_loop / t_group:5.1f}x faster"
    )
    print(
        f"  server-style (per image and per component):    {t_server:8.3f} s   -> group is {t_server / t_group:5.1f}x faster"
    )


if __name__ == "__main__":
    main()

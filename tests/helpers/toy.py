"""A toy model family (not Kontext) behind the Policy seam: a few lines are enough to train with divrl.

The network is a tiny diffusers model (so peft adapters, exports and ``from_pretrained`` work as for any diffusers
transformer); its "latents" are 3×8×8 images, conditioned on the reference's mean colour and the prompt's length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, FluxKontextPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from torch import nn

from divrl.images import to_image_batch
from divrl.policy import LoRAConfig, Policy, PolicyConfig


class ToyNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    @register_to_config
    def __init__(self, hidden: int = 32, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(192 + 5, hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(hidden, hidden)}) for _ in range(depth))
        self.out = nn.Linear(hidden, 192)

    def forward(self, x, sigma, cond):
        h = self.embed(torch.cat([x.flatten(1), cond, sigma[:, None]], 1))
        for block in self.blocks:
            h = h + torch.tanh(block["proj"](h))
        return self.out(h).view_as(x)


@dataclass
class ToyCondition:
    embedding: torch.Tensor  # (B, 4): the reference's mean colour and the prompt's length
    height: int
    width: int

    @property
    def batch_size(self) -> int:
        return self.embedding.shape[0]

    def select(self, index):
        return replace(self, embedding=self.embedding[index])


class ToyPolicy(Policy):
    lora_format = FluxKontextPipeline  # diffusers' transformer LoRA file layout

    def __init__(self, lora: LoRAConfig | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.transformer, self.lora_config = ToyNet().requires_grad_(False), lora
        if lora is not None:
            from divrl.policy.lora import add_adapter

            add_adapter(self.transformer, lora)
        self.seen: list = []  # the samples encode() was given (for the tests)

    def encode(self, samples, height, width, group_size=1):
        self.seen.append(list(samples))
        rows = [
            torch.cat([to_image_batch(s.reference).mean((0, 2, 3)), torch.tensor([len(s.prompt) / 100])])
            for s in samples
        ]
        return ToyCondition(torch.stack(rows).repeat_interleave(group_size, 0).to(self.device), height, width)

    def initial_noise(self, cond, generator=None):
        return torch.randn(cond.batch_size, 3, 8, 8, generator=generator).to(self.device)

    def velocity(self, latents, sigma, cond):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
        return self.transformer(latents, sigma, cond.embedding)

    def sigmas(self, num_steps, cond):
        return torch.linspace(1, 0, num_steps + 1)

    def decode(self, latents, cond):
        return F.interpolate((latents.float().clamp(-1, 1) + 1) / 2, size=(cond.height, cond.width), mode="nearest")

    def shard_units(self, network=None):
        return list((network or self.transformer).blocks)

    def frozen_parts(self):
        return []

    def flops_per_call(self, cond):
        return 2.0 * sum(p.numel() for p in self.transformer.parameters())


@dataclass
class ToyConfig(PolicyConfig):
    """The toy family's settings.

    Attributes:
        seed: weight seed of the toy network.
    """

    model: str = "toy"
    seed: int = 0

    def load(self) -> ToyPolicy:
        return ToyPolicy(self.lora, self.seed)


def mean_brightness(images, prompts, metadata):
    """A plain reward function: the mean brightness of each image."""
    return images.mean((1, 2, 3))

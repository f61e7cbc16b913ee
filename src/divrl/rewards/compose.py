"""Rewards made of other rewards or of plain functions: a weighted sum (trl's ``reward_weights``) and an adapter for
a callable ``fn(images, prompts, metadata) -> scores``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from divrl.rewards.base import RESERVED_COMPONENTS, Group, Reward, RewardOutput, check_setting

__all__ = ["WeightedReward", "CallableReward"]


class WeightedReward(Reward):
    """``Σ_i w_i · r_i`` over several rewards, each scored on the same group.

    Every part's reward is a component named after the part, and every part's components are kept as
    ``<part>/<component>`` (``reward/nssm/vsm``...); a sample is gated when any part gated it.

    Args:
        rewards: the parts.
        weights: one weight per part (default: 1 each).
        names: one name per part (default: the class names in lower case, numbered when repeated).
    """

    def __init__(
        self, rewards: Sequence[Reward], weights: Sequence[float] | None = None, names: Sequence[str] | None = None
    ):
        super().__init__()
        if not rewards:
            raise ValueError("WeightedReward: rewards is empty; give at least one reward")
        weights = (
            [1.0] * len(rewards)
            if weights is None
            else [  # negative weights are penalties; NaN is refused
                check_setting("WeightedReward", f"weights[{i}]", w) for i, w in enumerate(weights)
            ]
        )
        names = _default_names(rewards) if names is None else list(names)
        if len(weights) != len(rewards) or len(names) != len(rewards):
            raise ValueError(
                f"WeightedReward: {len(rewards)} rewards, {len(weights)} weights, {len(names)} names; give "
                f"one weight and one name per reward"
            )
        if len(set(names)) != len(names) or any("/" in n or not n for n in names):
            raise ValueError(f"WeightedReward: names must be distinct, non-empty and without '/', got {names}")
        self.parts = nn.ModuleList(rewards)
        self.weights = weights
        self.names = names

    @property
    def concurrency(self) -> int:
        return min(part.concurrency for part in self.parts)  # threads only when every part is safe on them

    def forward(self, group: Group) -> RewardOutput:
        total = torch.zeros(group.size, dtype=torch.float32)
        components: dict[str, Tensor] = {}
        gated = torch.zeros(group.size, dtype=torch.bool)
        for name, weight, part in zip(self.names, self.weights, self.parts):
            out = part(group)
            total = total + weight * out.reward.float()
            components[name] = out.reward
            components.update({f"{name}/{k}": v for k, v in out.components.items()})
            gated = gated | out.gated
        return RewardOutput(total, components, gated)


def _default_names(rewards: Sequence[Reward]) -> list[str]:
    base = [type(r).__name__.lower().removesuffix("reward") or "reward" for r in rewards]
    return [n if base.count(n) == 1 else f"{n}{base[:i].count(n)}" for i, n in enumerate(base)]


class CallableReward(Reward):
    """A plain function as a reward: ``fn(images, prompts, metadata) -> scores``.

    ``fn`` receives the group's images ``(G, 3, H, W)`` float in [0, 1], the prompt of each image and one metadata
    dict per image (the condition's ``id``, ``category``, ``references``, ``masks`` and the identity's further
    fields, e.g. ``source``), and returns ``G`` scores (a tensor or a sequence of numbers). The scores are the
    reward and the component ``name``.

    Args:
        fn: the function, or an importable dotted path to one (``"package.module.function"``), which is how a YAML
            config names it.
        name: the component's name (default: the function's name).
    """

    def __init__(self, fn: Callable | str, name: str | None = None):
        super().__init__()
        self.fn = _import(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"CallableReward: fn must be callable, got {self.fn!r}")
        self.name = name or getattr(self.fn, "__name__", "score")
        if not isinstance(self.name, str) or self.name in RESERVED_COMPONENTS:  # else refused at the first rollout
            raise ValueError(
                f"CallableReward: init_args.name {self.name!r} is taken by the reward's own metrics "
                f"({sorted(RESERVED_COMPONENTS)}): give the reward another name in its entry of "
                f"model.rewards"
            )

    def forward(self, group: Group) -> RewardOutput:
        sample = group.sample
        meta = {
            **sample.metadata,
            "id": sample.id,
            "category": sample.category,
            "references": sample.references,
            "masks": sample.masks,
        }
        scores = self.fn(group.images, [sample.prompt] * group.size, [dict(meta) for _ in range(group.size)])
        scores = torch.as_tensor(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=torch.float32)
        scores = scores.reshape(-1) if scores.numel() == group.size else scores  # (G, 1) -> (G,); wrong sizes refused
        return RewardOutput(scores, {self.name: scores})


def _import(path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"CallableReward: cannot import {path!r} ({err}); give 'package.module.function'") from err

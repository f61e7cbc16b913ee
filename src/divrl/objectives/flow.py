"""Flow-matching pieces shared by the objectives that train on clean images (SFT, DPO, DiffusionNFT): timestep
sampling, the forward process, per-sample errors and the losses, as small plain-torch functions.

Conventions (``DESIGN.md`` "The math"): a clean latent ``x₀``, noise ``ε`` and noise level ``σ ∈ [0, 1]`` give
``x_σ = (1 − σ)·x₀ + σ·ε``; the network's velocity ``v`` targets ``u = ε − x₀`` (``dx/dσ``). Errors are means over
every non-batch dimension, in float32. References for the formulas: ``docs/reference.md``, "Preference objectives".
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from divrl.objectives.base import Batch

__all__ = [
    "TimestepSampling",
    "FlowBatch",
    "draw",
    "shift_sigmas",
    "noised",
    "flow_error",
    "dpo_loss",
    "group_weights",
    "group_dpo_loss",
    "optimality",
    "nft_loss",
]


@dataclass
class TimestepSampling:
    """How the training noise levels ``σ`` of a flow-matching loss are drawn.

    Attributes:
        distribution: ``uniform`` (``σ ~ U(0, 1)``); ``logit_normal`` (``σ = sigmoid(mean + std·z)``, SD3 / FLUX
            training's choice); ``shifted``: uniform times pushed towards the noise as the model's sampler pushes its
            steps, ``σ = s·t / (1 + (s − 1)·t)`` with ``s = shift`` (FLUX at 512²: ``exp(μ) ≈ 1.88``); ``null``: the
            objective's default (SFT: ``logit_normal``; DPO, group DPO, NFT: ``uniform``).
        mean: the logit-normal's location (``logit_normal`` only).
        std: the logit-normal's scale (``logit_normal`` only).
        shift: the shift ``s`` of ``shifted``; ``null``: the policy's own at the training size
            (:meth:`~divrl.policy.Policy.time_shift`).
        low: the smallest ``σ``: draws are mapped affinely into ``[low, high]``.
        high: the largest ``σ``.
    """

    distribution: Literal["uniform", "logit_normal", "shifted"] | None = None
    mean: float = 0.0
    std: float = 1.0
    shift: float | None = None
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in ("uniform", "logit_normal", "shifted", None):
            raise ValueError(
                f"timesteps.distribution must be uniform, logit_normal or shifted, got {self.distribution!r}"
            )
        for name in ("mean", "std", "shift", "low", "high"):  # a NaN here makes every loss NaN, minutes later
            value = getattr(self, name)
            if value is not None and not (is_number(value) and math.isfinite(value)):
                raise ValueError(
                    f"objective.timesteps.{name} must be a finite number, got {value!r}: set it in the "
                    f"objective's timesteps (defaults: mean 0, std 1, low 0, high 1, shift null)"
                )
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"timesteps: need 0 <= low < high <= 1, got low {self.low}, high {self.high}")
        if not self.std > 0 or (self.shift is not None and not self.shift > 0):
            raise ValueError(f"timesteps: std and shift must be > 0, got std {self.std}, shift {self.shift}")

    def sample(
        self, n: int, generator: torch.Generator, *, shift: float | None = None, high: float | None = None
    ) -> Tensor:
        """``n`` float32 noise levels in ``[low, high]`` (``high`` may be lowered, e.g. by a decay schedule);
        ``shift`` is the policy's, used by ``shifted`` when :attr:`shift` is unset."""
        if self.distribution is None:
            raise ValueError("timesteps.distribution is unset: the objective sets its default (as_timesteps)")
        if self.distribution == "logit_normal":
            t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator))
        else:
            t = torch.rand(n, generator=generator)
            if self.distribution == "shifted":
                s = self.shift if self.shift is not None else shift
                if s is None:
                    raise ValueError(
                        "timesteps.distribution 'shifted' needs timesteps.shift or a policy with a time shift"
                    )
                t = shift_sigmas(t, s)
        top = self.high if high is None else min(high, self.high)
        return (self.low + (top - self.low) * t).float()


def as_timesteps(value: TimestepSampling | dict, distribution: str) -> TimestepSampling:
    """``value`` as :class:`TimestepSampling` (a YAML mapping of its fields becomes one), its ``distribution`` the
    objective's default ``distribution`` when unset."""
    value = TimestepSampling(**value) if isinstance(value, dict) else value
    return value if value.distribution is not None else replace(value, distribution=distribution)


def draw(
    timesteps: TimestepSampling,
    count: int,
    per_row: int,
    like: Tensor,
    generator: torch.Generator,
    *,
    policy=None,
    condition=None,
    high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``per_row`` (noise, noise level) draws for each of ``count`` rows, from ``generator`` (σ first, then ε: a
    resumed run draws the same): ``ε`` ``(count, per_row, *like.shape[1:])`` in ``like``'s dtype and ``σ``
    ``(count, per_row)`` float32, both on ``like``'s device. ``shifted`` without its own shift uses
    ``policy.time_shift(condition)``; ``high`` lowers the top of the range (a decay schedule)."""
    shift = policy.time_shift(condition) if timesteps.distribution == "shifted" and timesteps.shift is None else None
    sigmas = timesteps.sample(count * per_row, generator, shift=shift, high=high).view(count, per_row)
    noise = torch.randn((count, per_row, *like.shape[1:]), generator=generator).to(like)
    return noise, sigmas.to(like.device)


@dataclass
class FlowBatch(Batch):
    """Clean latents with their noise draws, for the objectives that train per sample on the forward process (SFT,
    DiffusionNFT); a work item is ``(sample indices, draw k)``.

    Attributes:
        x0: ``(N, ...)`` clean latents.
        noise: ``(N, K, ...)`` the noises of the ``K`` draws.
        sigmas: ``(N, K)`` float32 noise levels.
    """

    x0: Tensor | None = None
    noise: Tensor | None = None
    sigmas: Tensor | None = None

    def predict(self, policy, item: tuple[Tensor, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The policy's velocity (with gradients) for an item's samples noised at their draw ``k``, with the
        ``x₀``, ``ε`` and ``σ`` it was computed from."""
        index, k = item
        x0, noise, sigma = self.x0[index], self.noise[index, k], self.sigmas[index, k]
        return policy.velocity(noised(x0, noise, sigma), sigma, self.condition.select(index)), x0, noise, sigma


def shift_sigmas(t: Tensor, shift: float) -> Tensor:
    """FLUX / SD3's time shift ``s·t / (1 + (s − 1)·t)`` (``exp(μ) / (exp(μ) + 1/t − 1)`` written without the pole)."""
    return shift * t / (1 + (shift - 1) * t)


def _expand(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.reshape(-1, *([1] * (like.dim() - 1))).to(like.device, like.dtype)


def noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The forward process ``(1 − σ)·x₀ + σ·ε``, ``σ`` one value per row, computed in float32 (the policy casts its
    input to its own dtype)."""
    x0, noise = x0.float(), noise.float()
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_error(velocity: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Per-row flow-matching error ``mean ‖v − (ε − x₀)‖²`` (float32, ``(B,)``): the SFT loss, and the ``e`` of
    Diffusion-DPO."""
    return (velocity.float() - (noise.float() - x0.float())).pow(2).flatten(1).mean(1)


def dpo_loss(
    err_w: Tensor, ref_w: Tensor, err_l: Tensor, ref_l: Tensor, beta: float, margin: Tensor | float = 0.0
) -> tuple[Tensor, Tensor]:
    """Diffusion-DPO for flow matching, per pair: ``−log σ(z − m)`` with
    ``z = −β/2·[(e_θ − e_ref)(w) − (e_θ − e_ref)(l)]`` (winner ``w`` and loser ``l`` noised with the same ``ε`` and
    ``σ``) and a margin ``m`` (ODPO's offset; 0 is plain DPO). Returns the losses and ``z`` (the implicit reward
    margin, > 0 when the policy prefers the winner more than the reference does)."""
    z = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(z - margin), z


def group_weights(advantages: Tensor) -> tuple[Tensor, Tensor]:
    """DGPO's per-sample weights of each group (rows of ``advantages``, ``(n, G)``): the positives (``A > 0``) weighted
    ``|A| / Σ₊|A|`` and the negatives (``A < 0``) ``|A| / Σ₋|A|``, so each side's weights sum to 1 (0 for a side
    with no sample, and for ``A = 0``). Returns ``(w₊, w₋)``."""
    pos, neg = advantages.clamp(min=0), (-advantages).clamp(min=0)
    return pos / pos.sum(-1, keepdim=True).clamp(min=1e-12), neg / neg.sum(-1, keepdim=True).clamp(min=1e-12)


def group_dpo_loss(
    err: Tensor, ref: Tensor, advantages: Tensor, beta: float, margin: Tensor | float = 0.0
) -> tuple[Tensor, Tensor]:
    """Group-level DPO (DGPO) for each group (rows, ``(n, G)``): every sample's implicit reward
    ``s = −β/2·(e_θ − e_ref)``, the sides' scores ``R₊ = Σ w₊·s`` and ``R₋ = Σ w₋·s`` (:func:`group_weights`), and
    ``−log σ(R₊ − R₋ − m)`` with a margin ``m``. A group without positives or negatives has loss 0. Returns the losses
    ``(n,)`` and ``R₊ − R₋``."""
    scores = -0.5 * beta * (err - ref)
    w_pos, w_neg = group_weights(advantages)
    delta = (w_pos * scores).sum(-1) - (w_neg * scores).sum(-1)
    both = (advantages > 0).any(-1) & (advantages < 0).any(-1)
    return torch.where(both, -F.logsigmoid(delta - margin), torch.zeros_like(delta)), delta


def optimality(advantages: Tensor, clip: float) -> Tensor:
    """DiffusionNFT's optimality probability ``r = clip(A, ±c) / (2c) + 1/2`` in ``[0, 1]`` (1: best of the group)."""
    return advantages.clamp(-clip, clip) / (2 * clip) + 0.5


def nft_loss(
    velocity: Tensor,
    old_velocity: Tensor,
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    r: Tensor,
    beta: float,
    adaptive: bool = True,
) -> Tensor:
    """DiffusionNFT's loss per row: the implicit positive policy ``v₊ = β·v_θ + (1 − β)·v_old`` and negative policy
    ``v₋ = (1 + β)·v_old − β·v_θ``, each with its ``x₀``-prediction error ``L± = mean ‖x_σ − σ·v± − x₀‖²``
    ``= σ²·mean ‖v± − (ε − x₀)‖²``, combined as ``(r·L₊ + (1 − r)·L₋) / β``. ``adaptive`` divides each ``L`` by its
    detached mean absolute ``x₀`` error (DiffusionNFT's adaptive weighting). Its minimiser in ``v_θ`` is
    ``v_old + (2r − 1)·(u − v_old) / β``: towards the sample's flow for ``r > 1/2``, away from it below."""
    u = (noise - x0).float()
    v, v_old = velocity.float(), old_velocity.float()
    s = _expand(sigma, u).float()
    losses = []
    for implicit in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
        err = s * (implicit - u)  # x_σ − σ·v − x₀
        loss = err.pow(2).flatten(1).mean(1)
        if adaptive:
            loss = loss / err.detach().abs().flatten(1).mean(1).clamp(min=1e-5)
        losses.append(loss)
    return (r * losses[0] + (1 - r) * losses[1]) / beta


def _check_beta(beta: float, name: str = "beta") -> None:
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"objective.{name} must be a positive number, got {beta}")


def _check_finite(obj: object, *names: str, low: float | None = None, infinite: bool = False) -> None:
    """Refuse settings of ``obj`` that are not finite numbers (or below ``low``), naming them: a NaN or infinite
    setting only shows as non-finite losses or a run that trains nothing, minutes later. ``infinite``: the settings
    may be ``±inf`` or ``None`` (a clip range: no clipping), only NaN and non-numbers are refused."""
    for name in names:
        value = getattr(obj, name)
        if infinite and (value is None or (is_number(value) and math.isinf(value))):
            continue
        if not is_number(value) or not math.isfinite(value) or (low is not None and value < low):
            raise ValueError(
                f"objective.{name} must be a finite number{'' if low is None else f' >= {low:g}'}, got "
                f"{value!r}: set it in the objective's init_args"
            )


def is_number(value) -> bool:
    """A real number (Python, numpy or a 0-d tensor's ``.item()``-able scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

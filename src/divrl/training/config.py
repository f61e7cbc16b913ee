"""The settings of a run, grouped by concern (``docs/configuration.md`` maps each to trl's and flow_grpo's names):

- ``model.policy``: the model family and how it loads (:class:`~divrl.policy.PolicyConfig`; FLUX.1 Kontext:
  :class:`~divrl.policy.KontextConfig`);
- ``model.sampling``: how rollouts are drawn (:class:`~divrl.objectives.SamplingConfig`);
- ``model.objective``: the loss and its settings (:class:`~divrl.objectives.GRPOObjective` by default);
- ``model.system``: how the run executes and guards itself (:class:`SystemConfig`).

Defaults are the published DivRL run (``docs/reference.md``, "The published run") unless a field says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from divrl.objectives.base import SamplingConfig, positive
from divrl.objectives.grpo import GRPOConfig
from divrl.policy.base import PolicyConfig
from divrl.policy.kontext import KontextConfig

__all__ = [
    "SystemConfig",
    "SamplingConfig",
    "PolicyConfig",
    "KontextConfig",
    "GRPOConfig",
    "check_optimizer",
    "check_settings",
]


@dataclass
class SystemConfig:
    """How the run executes and guards itself (``model.system``).

    Attributes:
        rollout_micro_batch_size: samples per transformer call during rollouts (``None``: the whole batch); bounds
            rollout memory, results do not depend on it beyond floating-point reassociation.
        rollout_keep_gathered: under FSDP2, gather each transformer block's shards once per rollout and keep them for
            every denoising step (one all-gather per block per rollout instead of per step), at the cost of the
            whole transformer on each GPU during the rollout, in its parameter dtype: FLUX.1 Kontext with a LoRA
            (bf16 base) 23.8 GB; full fine-tuning (fp32) 47.6 GB, so turn it off there on 80 GB GPUs. ``false``
            re-gathers block by block at every step (ZeRO-3 memory). Ignored without sharding and under FSDP1 (whose
            units re-gather at every step under ``FULL_SHARD``; its ``SHARD_GRAD_OP`` keeps them gathered).
        rollout_chunk_groups: roll out this many groups (conditions, ``group_size`` samples each) at a time, each
            chunk from noise to decoded images before the next starts (``None``: the whole batch at once). The chunks
            draw their noise one after the other: a different random stream than one whole-batch rollout, the same
            with or without ``overlap_rewards``. It applies to every sampling of the run (validation, ``divrl
            sample`` and ``divrl evaluate`` with this config included).
        overlap_rewards: score each chunk's groups while the next chunk rolls out (a background thread for a local
            reward, requests in flight for a :class:`~divrl.rewards.RemoteReward`); needs ``rollout_chunk_groups``.
            Strictly on-policy: the update starts after every group of the batch is scored, and the run's weights are
            bit-identical to the same run without overlap. A reward that draws from torch's global RNG is the
            exception: its draws then interleave with the rollout's.
        max_grad_norm: gradient-norm clip of every update (paper: 1.0); ``None`` disables clipping.
        max_consecutive_skips: stop with an error after this many updates in a row were skipped for a non-finite
            loss or gradient.
        max_empty_rollouts: stop with an error after this many rollouts in a row in which no rank kept a single group
            (every reward non-finite): such a rollout trains nothing and is not applied, so the run would otherwise
            spin without learning.
    """

    rollout_micro_batch_size: int | None = None
    rollout_keep_gathered: bool = True
    rollout_chunk_groups: int | None = None
    overlap_rewards: bool = False
    max_grad_norm: float | None = 1.0
    max_consecutive_skips: int = 10
    max_empty_rollouts: int = 10

    def __post_init__(self) -> None:
        positive(self, "system", "max_consecutive_skips", "max_empty_rollouts")
        if self.rollout_micro_batch_size is not None:
            positive(self, "system", "rollout_micro_batch_size")
        if self.rollout_chunk_groups is not None:
            positive(self, "system", "rollout_chunk_groups")
        if self.overlap_rewards and self.rollout_chunk_groups is None:
            raise ValueError(
                "system.overlap_rewards scores a chunk of groups while the next chunk rolls out: set "
                "system.rollout_chunk_groups too (e.g. 1, one group per chunk)"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"system.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


def check_settings(optimizer, lr_scheduler=None, peak_tflops: float | None = None) -> None:
    """The module's own settings, refused when the config is read: ``peak_tflops`` and :func:`check_optimizer`."""
    if peak_tflops is not None and not 0 < peak_tflops < float("inf"):
        raise ValueError(f"model.peak_tflops must be a positive number of TFLOP/s (or null), got {peak_tflops}")
    check_optimizer(optimizer, lr_scheduler)


def check_optimizer(optimizer, lr_scheduler=None) -> None:
    """Build ``model.optimizer`` (and ``model.lr_scheduler``) once over a stand-in parameter, so settings torch refuses
    (a negative learning rate, betas outside [0, 1)...) stop the run when the config is read, naming the key, not
    after minutes of loading the model. Only torch's own refusals (``ValueError``) are reported here; anything else
    an optimizer may need (a GPU parameter...) is left to the real construction."""
    probe = torch.nn.Parameter(torch.zeros(2, 2))  # 2-D: some optimizers (Muon) take matrices only
    try:
        built = optimizer([probe])
    except ValueError as err:
        raise ValueError(f"model.optimizer: {err}; fix model.optimizer.init_args") from None
    except Exception:  # noqa: BLE001 - not a settings error this probe can judge
        return
    if lr_scheduler is None:
        return
    try:
        lr_scheduler(built)
    except ValueError as err:
        raise ValueError(f"model.lr_scheduler: {err}; fix model.lr_scheduler.init_args") from None
    except Exception:  # noqa: BLE001 - as above
        return

"""``DivRLModule``: post-training of a policy with an objective and per-stage rewards, as a LightningModule.

The module only orchestrates (manual optimization: Lightning 2.x has no custom loops). One ``training_step`` = one
batch of conditions (identity + prompt):

1. the stage's objective **collects** a batch (for GRPO: rollouts, rewards, advantages) through the module's
   :class:`~divrl.training.environment.RunEnvironment`; a group whose reward is not finite is skipped and counted,
   any other reward error stops the run on every rank, and a rollout in which no rank kept a group is not applied;
2. for each of the objective's **updates**: every work item's loss is backpropagated (the same backward calls on
   every rank, whatever the data), then the accumulated gradient is clipped and applied, unless the loss or the
   gradient is non-finite on any rank (then the update is skipped everywhere and counted); then the metrics.

The curriculum's stage (which reward and which objective are active) is module state, switched by
:class:`~divrl.training.StageSwitch` and saved in checkpoints (which hold only trainable weights).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from docstring_parser import DocstringStyle
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from divrl.data.stream import ConditionBatch, ConditionSample
from divrl.grpo.sampler import rollout_chunks
from divrl.objectives.base import Batch, Objective, SamplingConfig
from divrl.objectives.grpo import GRPOObjective
from divrl.policy.base import PolicyConfig
from divrl.policy.compute import compile_seconds
from divrl.policy.kontext import KontextConfig
from divrl.policy.sharding import all_reduce_grads, gathered, grad_norm
from divrl.rewards.base import Reward
from divrl.training import checkpoints
from divrl.training.config import SystemConfig, check_settings
from divrl.training.environment import (
    RolloutGroup,
    RunEnvironment,
    agreed,
    device_peak,
    end_of_run,
    reward_metrics,
    score_groups,
    throughput,
    trains_on,
)
from divrl.training.strategies import (
    check_optimizer_strategy,
    check_strategy,
    data_parallel_mesh,
    is_fsdp1,
    shard_policy,
)
from divrl.utils import mix_seeds

__all__ = ["DivRLModule", "default_optimizer"]

log = logging.getLogger(__name__)

# A plain mapping under model.policy configures the default family (FLUX.1 Kontext); class_path selects another. The
# docstrings (the --help texts) are Google style.
set_parsing_settings(subclasses_enabled=[PolicyConfig], docstring_parse_style=DocstringStyle.GOOGLE)


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW as in the published run: lr 3e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8."""
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


class DivRLModule(pl.LightningModule):
    """On-policy post-training of a generator: DivRL's Explore-and-Suppress with Flow-GRPO by default.

    Args:
        policy: the model family, which weights to load and the adapter (built in ``configure_model``).
        rewards: one reward per curriculum stage: DivRL's Explore-and-Suppress is ``[NSSMReward, GatedReward]``;
            :class:`~divrl.training.StageSwitch` moves from one to the next. A single entry scores every stage.
        objective: the training objective, or one per stage (default: :class:`~divrl.objectives.GRPOObjective`).
        sampling: how rollouts are drawn (group size, steps, noise level, resolution, seed).
        system: rollout micro-batches, FSDP2 gathering, the gradient-norm clip and the stop conditions.
        optimizer: the optimizer factory over the trainable parameters (default: the paper's AdamW, lr 3e-4).
        lr_scheduler: optional scheduler factory (the paper uses none).
        peak_tflops: the accelerator's dense bf16 peak, for the logged MFU (``perf/mfu``); ``None`` looks the CUDA
            device's name up in :data:`divrl.policy.flops.PEAK_TFLOPS` (no MFU when unknown or on CPU).
    """

    def __init__(
        self,
        policy: PolicyConfig = KontextConfig(),  # noqa: B008 - copied below
        rewards: Sequence[Reward] | None = None,
        objective: Objective | list[Objective] = GRPOObjective(),  # noqa: B008 - copied below
        sampling: SamplingConfig = SamplingConfig(),  # noqa: B008 - copied below
        system: SystemConfig = SystemConfig(),  # noqa: B008 - copied below
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        peak_tflops: float | None = None,
    ):
        super().__init__()
        rewards = [rewards] if isinstance(rewards, Reward) else list(rewards or [])
        if not rewards:
            raise ValueError("DivRLModule: rewards is empty; give one reward per stage, e.g. [NSSMReward, GatedReward]")
        objectives = [objective] if isinstance(objective, Objective) else list(objective)
        if not objectives:
            raise ValueError("DivRLModule: objective is an empty list; give one objective, or one per stage")
        self.policy_config = copy.copy(policy)  # the defaults are shared instances
        self.sampling = copy.copy(sampling)
        self.system = copy.copy(system)
        self.objectives = [copy.copy(o) for o in objectives]
        for o in self.objectives:
            o.check(self.sampling)
        self.rewards = nn.ModuleList(rewards).requires_grad_(False)  # reward models are judges, never trained
        check_settings(optimizer, lr_scheduler, peak_tflops)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self._optimizer_settings = self._resumed_settings = None  # configured here / by the resumed checkpoint's run
        self.peak_tflops = peak_tflops
        self.policy = None  # built in configure_model (so sharded strategies can wrap it)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights; see on_load_checkpoint
        self.stage = 0
        self.rollouts_done = 0  # rollout batches trained on (seeds the rollout noise; checkpointed)
        self.counters = defaultdict(int)  # skipped samples, groups, updates and empty rollouts since the start
        self.last_group: RolloutGroup | None = None
        self._consecutive_skips = self._empty_rollouts = 0
        self.empty_reason = ""  # what the last batch not applied lacked (see environment.trains_on)
        self.save_hyperparameters(ignore=["rewards", "optimizer", "lr_scheduler"])

    # ------------------------------------------------------------------------------------------------ setup

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        check_strategy(strategy, self.policy_config)
        self.policy = self.policy_config.build()
        mesh = data_parallel_mesh(self.device_mesh)  # set by ModelParallelStrategy (FSDP2); None otherwise
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        reference = None
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        if self.policy.train_transformer and fitting and any(o.needs_reference for o in self.objectives):
            # Full fine-tuning's KL reference: a frozen copy of the initial network that never doubles GPU memory:
            # sharded like the policy under FSDP2, else kept on the CPU and streamed block by block on a GPU.
            reference = self.policy.keep_reference(offload=mesh is None and device.type != "cpu")
        if mesh is not None or is_fsdp1(strategy):
            # Sharded strategies move nothing themselves: the frozen parts every rank holds whole go to this rank's
            # device here; the sharding moves each block's shard there itself, one block at a time.
            self.rewards.to(device)
            for part in self.policy.frozen_parts():
                part.to(device)
            shard_policy(self.policy, strategy, mesh, reference)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DivRLModule: nothing to train (policy.lora is null and no parameter requires grad)")
        optimizer = self.optimizer_factory(params)
        check_optimizer_strategy(optimizer, self._trainer.strategy if self._trainer is not None else None)
        scheduler = self.scheduler_factory(optimizer) if self.scheduler_factory is not None else None
        self._optimizer_settings = checkpoints.optimizer_settings(optimizer, scheduler)  # re-applied on resume
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run trains with the command line's optimizer and scheduler settings, not the checkpoint's (which
        Lightning restored with the optimizer's state): those that changed are re-applied and listed in a warning."""
        changes = checkpoints.apply_optimizer_settings(
            self.optimizers().optimizer, self.lr_schedulers(), self._optimizer_settings, self._resumed_settings
        )
        if changes and self.global_rank == 0:
            warnings.warn(
                f"optimizer settings that differ from the checkpoint's; the command line's apply: {'; '.join(changes)}",
                stacklevel=2,
            )

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen base (T5/CLIP dropout) and the reward backbones always run in eval mode; LoRA dropout is 0.
        if self.policy is not None:
            self.policy.eval()
        self.rewards.eval()
        return self

    @property
    def reward(self) -> Reward:
        """The reward of the current stage."""
        return self.rewards[min(self.stage, len(self.rewards) - 1)]

    @property
    def objective(self) -> Objective:
        """The objective of the current stage."""
        return self.objectives[min(self.stage, len(self.objectives) - 1)]

    # ------------------------------------------------------------------------------------------------ training

    def training_step(self, batch: ConditionBatch, batch_idx: int) -> None:
        self.counters["skipped_samples"] += batch.skipped
        began = self._clock()
        env = RunEnvironment(self, self.reward, self.sampling)
        generator = torch.Generator().manual_seed(mix_seeds(self.sampling.seed, self.global_rank, self.rollouts_done))
        compiled = compile_seconds() if self.policy_config.compile else 0.0
        with self.policy.attention():
            collected = self.objective.collect(self.policy, batch.conditions, env, generator)
            metrics = self._collected_metrics(collected)
            start = self._clock()
            trains = trains_on(self, collected)
            stats = self._update(collected) if trains else {}
            update_s = self._clock() - start
        self.rollouts_done += 1
        metrics.update(stats)
        samples = len(collected.samples) * collected.group_size
        peak = self.peak_tflops or device_peak(self.device)
        metrics.update(throughput(self.policy, collected, samples, env.timings["rollout"], update_s, peak, trains))
        if self.policy_config.compile:  # the blocks compile on the first rollout and update (and on new shapes)
            metrics["perf/compile_s"] = compile_seconds() - compiled
            if metrics["perf/compile_s"] > 1.0:
                log.info("torch.compile: %.1f s compiling in rollout %d", metrics["perf/compile_s"], self.rollouts_done)
        self.counters["train_seconds"] += self._clock() - began  # training steps only (not validation), resumes too
        metrics.update(
            {
                "time/rollout": env.timings["rollout"],
                "time/reward": env.timings["reward"],
                "time/update": update_s,
                "train/stage": float(self.stage),
                "time/train_s": float(self.counters["train_seconds"]),
                "data/skipped_samples": float(self.counters["skipped_samples"]),
                "train/skipped_groups": float(self.counters["skipped_groups"]),
                "train/skipped_updates": float(self.counters["skipped_updates"]),
                "train/empty_rollouts": float(self.counters["empty_rollouts"]),
            }
        )
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        for name, key in (("reward", "reward/mean"), ("loss", "train/loss")):  # the bar shows SFT's loss, no NaN reward
            if key in metrics:
                self.log(name, metrics[key], prog_bar=True, on_step=True, logger=False, batch_size=len(batch))

    def on_train_end(self) -> None:
        end_of_run(self)

    def _collected_metrics(self, collected: Batch) -> dict[str, float]:
        if collected.scores is None:
            return {}
        outputs, g = collected.scores.outputs, collected.group_size
        first = next((i for i, o in enumerate(outputs) if o is not None), None)  # the first scored group is drawn
        self.last_group = None
        if first is not None and collected.images is not None:
            images = collected.images[first * g : (first + 1) * g].detach().float().cpu()
            self.last_group = RolloutGroup(
                self.global_step, self.stage, collected.samples[first], images, outputs[first]
            )
        return reward_metrics(outputs, "reward")

    def _update(self, collected: Batch) -> dict[str, float]:
        """Every optimizer step of the objective's updates; returns the mean of the applied updates' statistics."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        generator = torch.Generator().manual_seed(
            mix_seeds(self.sampling.seed + 1, self.global_rank, self.rollouts_done)
        )
        sums: dict[str, float] = defaultdict(float)
        updates = 0
        for items in self.objective.updates(collected, generator):
            stats = self._step(optimizer, scheduler, self._accumulate(collected, items))
            if stats is not None:
                updates += 1
                for k, v in stats.items():
                    sums[k] += v
        return {k: v / updates for k, v in sums.items()} if updates else {}

    def _accumulate(self, collected: Batch, items: list) -> dict[str, Tensor]:
        """Backward the loss of every work item of one update; returns the update's statistics as 0-d tensors.

        Every loss is backpropagated, finite or not (a non-finite one poisons the gradient, which :meth:`_step` then
        refuses): the backward calls, DDP collectives, never depend on the data, and the statistics stay on the device
        (no host sync per item).
        """
        count = len(items)
        if not count:
            raise ValueError(
                f"{type(self.objective).__name__}.updates yielded an empty update: every update needs at "
                f"least one work item (and the same number on every rank)"
            )
        max_stats = self.objective.max_stats
        sums: dict[str, Tensor] = {}

        def add(key: str, value: Tensor, mean: bool = True) -> None:
            """Accumulate a per-item value: its mean over the update (float64), or its maximum (``mean=False``)."""
            value = value.detach().double() / (count if mean else 1)
            sums[key] = value if key not in sums else (sums[key] + value if mean else torch.maximum(sums[key], value))

        for item in items:
            loss, stats = self.objective.loss(self.policy, collected, item)
            self.manual_backward(loss / count)
            add("train/loss", loss)
            for k, v in stats.items():
                add(f"train/{k}", v, mean=k not in max_stats)
        return sums

    def _step(self, optimizer, scheduler, sums: dict[str, Tensor]) -> dict[str, float] | None:
        """Clip and apply the accumulated gradient, unless the loss or the gradient is non-finite on any rank (then
        the update is skipped everywhere and counted). Returns the update's statistics, or ``None`` when skipped."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if is_fsdp1(self.trainer.strategy):  # FSDP1 leaves the LoRA weights unwrapped: averaged here, as DDP would
            all_reduce_grads(params)
        norm = grad_norm(params)  # sharded gradients: a collective over the shards
        stats = {k: v.item() for k, v in sums.items()}  # the one host sync of the update
        finite = math.isfinite(stats["train/loss"]) and math.isfinite(norm.item())
        if not finite:
            log.warning(
                "non-finite %s at rollout %d: update skipped",
                "loss" if not math.isfinite(stats["train/loss"]) else "gradient norm",
                self.rollouts_done,
            )
        if not self._agree(finite):  # any rank non-finite: all skip
            if finite:
                log.warning("update at rollout %d skipped: another rank had a non-finite loss", self.rollouts_done)
            self._skip(optimizer)
            return None
        if self.system.max_grad_norm is not None:  # by the norm computed above (sharded or not): no second pass
            torch.nn.utils.clip_grads_with_norm_(params, self.system.max_grad_norm, norm)
        stats["train/grad_norm"] = norm.item()
        stats["train/lr"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        self._consecutive_skips = 0
        return stats

    def _skip(self, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.counters["skipped_updates"] += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.system.max_consecutive_skips:
            raise FloatingPointError(
                f"{self._consecutive_skips} updates in a row had a non-finite loss or gradient; stopping instead of "
                f"training on garbage. Lower the learning rate, check the rewards, or raise system.max_consecutive_skips"
            )

    # ------------------------------------------------------------------------------------------------ sampling

    def _trajectories(
        self,
        samples: Sequence[ConditionSample],
        group_size: int,
        generator: torch.Generator,
        *,
        num_steps: int | None = None,
        noise_level: float | None = None,
        sde_steps=None,
        on_chunk=None,
    ):
        """``group_size`` trajectories per condition with decoded images: the one sampling path of training,
        validation, ``divrl sample`` and ``divrl evaluate``; ``system.rollout_chunk_groups`` groups at a time when set,
        each chunk's decoded images handed to ``on_chunk(rows, images)`` (pipelined scoring)."""
        sampling = self.sampling
        steps = num_steps or sampling.num_steps
        noise = sampling.noise_level if noise_level is None else noise_level
        size = sampling.resolution
        # a sample the policy cannot encode (a precomputed payload of another size...) stops every rank together
        condition = agreed(lambda: self.policy.encode(samples, size, size, group_size), self._agree, "encoding")
        keep = self.system.rollout_keep_gathered
        with torch.no_grad(), gathered(self.policy.network) if keep else contextlib.nullcontext():  # FSDP2: one gather
            settings = dict(
                num_steps=steps,
                noise_level=noise,
                sde_steps=sde_steps if noise > 0 else [False] * steps,
                generator=generator,
                micro_batch_size=self.system.rollout_micro_batch_size,
            )
            rows = (self.system.rollout_chunk_groups or len(samples)) * group_size  # None: one chunk, the batch
            trajectory = rollout_chunks(self.policy, condition, rows, on_chunk=on_chunk, **settings)
        return condition, trajectory

    @torch.no_grad()
    def generate(
        self,
        samples: Sequence[ConditionSample],
        num_samples: int,
        generator: torch.Generator,
        *,
        num_steps: int | None = None,
        noise_level: float = 0.0,
    ) -> Tensor:
        """``num_samples`` images per condition, ``(len(samples)·num_samples, 3, H, W)`` in [0, 1]: the deterministic
        sampler by default (``noise_level > 0`` samples like training rollouts, every step stochastic), at
        ``sampling.resolution`` with ``num_steps`` (default ``sampling.num_steps``) steps, with the policy's attention
        kernels. With a LoRA, call it inside ``policy.adapter_disabled()`` for the base model."""
        with self.policy.attention():
            _, trajectory = self._trajectories(
                samples, num_samples, generator, num_steps=num_steps, noise_level=noise_level
            )
        return trajectory.images

    # ------------------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: ConditionBatch, batch_idx: int) -> None:
        """Deterministic (ODE) samples with fixed seeds per identity, scored by the current stage's reward."""
        g = self.sampling.val_group_size
        generator = torch.Generator().manual_seed(mix_seeds(self.sampling.seed + 2, self.global_rank, batch_idx))
        images = self.generate(batch.conditions, g, generator)
        scores = score_groups(self.reward, batch.conditions, images, g, self.device, self._agree)
        self.log_dict(reward_metrics(scores.outputs, "val"), on_epoch=True, batch_size=len(batch), sync_dist=True)

    # ------------------------------------------------------------------------------------------------ helpers

    def _agree(self, decision: bool) -> bool:
        """``decision`` and-ed over every rank (one collective; the decision itself in one process or without a
        trainer, as in ``divrl sample``)."""
        if self._trainer is None:
            return decision
        return self._trainer.strategy.reduce_boolean_decision(decision, all=True)

    def _count_skipped_group(self) -> None:
        self.counters["skipped_groups"] += 1

    def _clock(self) -> float:
        """Wall-clock seconds after the device finished its queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------------------------------------ checkpoints

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights by their unwrapped names (this rank's shards under FSDP2); no collective."""
        return checkpoints.trainable_state_dict(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.keep_trainable(checkpoint, self)
        checkpoint["divrl"] = {
            "stage": self.stage,
            "rollouts_done": self.rollouts_done,
            "counters": dict(self.counters),
            "optimizer_settings": self._optimizer_settings,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("divrl", {})
        self.stage = int(state.get("stage", 0))
        self.rollouts_done = int(state.get("rollouts_done", 0))
        self._resumed_settings = state.get("optimizer_settings") or {}  # {}: a checkpoint older than the record
        self.counters = defaultdict(int, state.get("counters", {}))
        checkpoints.resumed_settings(checkpoint, self.hparams, self.policy)
        if self.policy is not None:
            checkpoints.check_trainable_keys(set(self.trainable_state_dict()), set(checkpoint["state_dict"]))

"""``DivRLModule``: Flow-GRPO post-training of a Kontext policy with DivRL's rewards, as a LightningModule.

One ``training_step`` = one batch of conditions (identity + prompt):

1. **rollout** (no grad): ``G`` SDE trajectories per condition, log-probs recorded (the *old policy*);
2. **reward**: each group scored against its reference by the reward of the current stage (reference features
   once per group); a group whose reward is not finite is skipped and counted, never turned into 0;
3. **advantages** per group (or over the batch of every rank);
4. **update**: ``ppo_epochs`` passes; each pass shuffles the samples into ``updates_per_epoch`` parts, and each part
   is one optimizer step accumulated over micro-batches × trained timesteps (manual optimization: Lightning 2.x
   has no custom loops). A non-finite loss or gradient skips the update (counted), never applies it.

The reference policy of the KL term is the same network with the adapter off; ``kl_beta = 0`` skips it. The
curriculum's stage (which reward of ``rewards`` is active) is module state, switched by
:class:`~divrl.training.callbacks.StageSwitch` and saved in checkpoints. Checkpoints hold only trainable weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from divrl.data.stream import ConditionBatch, ConditionSample
from divrl.grpo import (
    group_advantages,
    pooled_advantages,
    grpo_loss,
    kl_divergence,
    rollout,
    select_train_steps,
    transition_log_prob,
)
from divrl.grpo.timesteps import sde_mask
from divrl.policy.flops import PEAK_TFLOPS, transformer_flops
from divrl.policy.sharding import (
    all_reduce_grads,
    gathered,
    grad_norm,
    shard_transformer,
    shard_transformer_fsdp1,
    trainable_parameters,
)
from divrl.rewards.modules import GroupReward, RewardOutput
from divrl.training.config import GRPOConfig, PolicyConfig

__all__ = ["DivRLModule", "RolloutGroup", "default_optimizer", "check_optimizer_strategy"]

log = logging.getLogger(__name__)


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW as in the published run: lr 3e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8."""
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)


@dataclass
class RolloutGroup:
    """One scored group, kept for image logging: the reference, the ``G`` samples and their scores (CPU)."""

    step: int
    stage: int
    id: str
    prompt: str
    reference: object
    images: Tensor
    reward: Tensor
    nssm: Tensor | None
    vsm: Tensor | None


class DivRLModule(pl.LightningModule):
    """DivRL / Flow-GRPO training of a Kontext policy.

    Args:
        policy: which model to load and its LoRA (built in ``configure_model``).
        rewards: one reward per curriculum stage: DivRL's Explore-and-Suppress is ``[NSSMReward, GatedReward]``;
            :class:`~divrl.training.callbacks.StageSwitch` moves from one to the next. A single entry trains one
            reward throughout.
        grpo: the Flow-GRPO hyperparameters.
        optimizer: the optimizer factory over the trainable parameters (default: the paper's AdamW, lr 3e-4).
        lr_scheduler: optional scheduler factory (the paper uses none).
        peak_tflops: the accelerator's dense bf16 peak, for the logged MFU (``perf/mfu``); ``None`` looks the CUDA
            device's name up in :data:`divrl.policy.flops.PEAK_TFLOPS` (no MFU when unknown or on CPU).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        rewards: Sequence[GroupReward],
        grpo: GRPOConfig = GRPOConfig(),  # noqa: B008 - an immutable-by-convention default, copied below
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        peak_tflops: float | None = None,
    ):
        super().__init__()
        if isinstance(rewards, GroupReward):
            rewards = [rewards]
        if not rewards:
            raise ValueError("DivRLModule: rewards is empty; give one reward per stage, e.g. [NSSMReward, GatedReward]")
        self.policy_config = policy
        self.grpo = replace(grpo) if grpo is not None else GRPOConfig()
        self.rewards = nn.ModuleList(rewards).requires_grad_(False)  # reward models are judges, never trained
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.peak_tflops = peak_tflops
        self.policy = None  # built in configure_model (so sharded strategies can wrap it)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable weights; see on_load_checkpoint
        self.stage = 0
        self.rollouts_done = 0  # rollout batches trained on (seeds the rollout noise; checkpointed)
        self.counters = defaultdict(int)  # skipped samples, groups and updates since the start of training
        self.last_group: RolloutGroup | None = None
        self._consecutive_skips = 0
        self._warned_model = False
        self.save_hyperparameters(ignore=["rewards", "optimizer", "lr_scheduler"])

    # ------------------------------------------------------------------------------------------------ setup

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        check_strategy(strategy, self.policy_config)
        self.policy = self.policy_config.build()
        mesh = self._data_parallel_mesh()
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        reference = None
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        if self.policy.train_transformer and self.grpo.kl_beta > 0 and fitting:
            # Full fine-tuning's KL reference: a frozen copy of the initial transformer that never doubles GPU memory:
            # sharded like the policy under FSDP2, else kept on the CPU and streamed block by block on a GPU.
            reference = self.policy.keep_reference(offload=mesh is None and device.type != "cpu")
        if mesh is not None:
            # FSDP2 (ModelParallelStrategy): the strategy moves nothing itself, so the frozen VAE, text encoders and
            # reward backbones go to this rank's device here; fully_shard moves each transformer block's shard there
            # itself, one block at a time (moving the whole transformer first would need all of it on each GPU).
            self._move_whole_parts(device)
            shard_transformer(self.policy.transformer, mesh)
            if reference is not None:
                shard_transformer(reference, mesh)
        elif _is_fsdp1(strategy):
            # FSDP1: each block's frozen base is one unit, the transformer the root unit around them (moved to the
            # device and sharded unit by unit); the LoRA weights stay whole on every rank (averaged in _step).
            self._move_whole_parts(device)
            kwargs = strategy.wrap_kwargs()
            self.policy.transformer = shard_transformer_fsdp1(self.policy.transformer, kwargs.pop("device"), **kwargs)

    def _move_whole_parts(self, device: torch.device) -> None:
        """The frozen parts every rank holds whole (VAE, text encoders, reward backbones) to this rank's device:
        sharded strategies move nothing themselves."""
        self.rewards.to(device)
        for part in (self.policy.vae, self.policy.text_encoder, self.policy.text_encoder_2):
            if part is not None:
                part.to(device)

    def _data_parallel_mesh(self):
        mesh = self.device_mesh  # set by ModelParallelStrategy (FSDP2); None otherwise
        if mesh is None:
            return None
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError("DivRLModule: tensor parallelism is not supported; use tensor_parallel_size: 1 (FSDP2)")
        return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DivRLModule: nothing to train (policy.lora is null and no parameter requires grad)")
        optimizer = self.optimizer_factory(params)
        check_optimizer_strategy(optimizer, self._trainer.strategy if self._trainer is not None else None)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen base (T5/CLIP dropout) and the reward backbones always run in eval mode; LoRA dropout is 0.
        if self.policy is not None:
            self.policy.eval()
        self.rewards.eval()
        return self

    @property
    def reward(self) -> GroupReward:
        """The reward of the current stage."""
        return self.rewards[min(self.stage, len(self.rewards) - 1)]

    # ------------------------------------------------------------------------------------------------ training

    def training_step(self, batch: ConditionBatch, batch_idx: int) -> None:
        with self.policy_config.attention():
            self._training_step(batch)

    def _training_step(self, batch: ConditionBatch) -> None:
        cfg = self.grpo
        self.counters["skipped_samples"] += batch.skipped
        metrics: dict[str, float] = {}

        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(_mix(cfg.seed, self.global_rank, self.rollouts_done))
        condition, trajectory = self._rollout(batch.conditions, cfg.group_size, cfg.noise_level, generator)
        t1 = self._clock()
        rewards, keep, outputs = self._score(batch.conditions, trajectory.images, cfg.group_size)
        t2 = self._clock()
        metrics.update(_reward_metrics(outputs, "reward"))
        self._remember_group(batch.conditions, trajectory.images, outputs)

        advantages = self._advantages(rewards, keep)
        stats = self._update(trajectory, condition, advantages, keep)
        t3 = self._clock()
        self.rollouts_done += 1

        metrics.update(stats)
        metrics.update(self._throughput(len(batch) * cfg.group_size, t1 - t0, t3 - t2))
        metrics.update({
            "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
            "train/stage": float(self.stage),
            "data/skipped_samples": float(self.counters["skipped_samples"]),
            "train/skipped_groups": float(self.counters["skipped_groups"]),
            "train/skipped_updates": float(self.counters["skipped_updates"]),
        })  # fmt: skip
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        self.log("reward", metrics.get("reward/mean", float("nan")), prog_bar=True, on_step=True, logger=False,
                 batch_size=len(batch))  # fmt: skip

    def _clock(self) -> float:
        """Wall-clock seconds after the device finished its queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _throughput(self, samples: int, rollout_s: float, update_s: float) -> dict[str, float]:
        """Achieved TFLOP/s of the rollout and the update (analytic FLUX FLOPs) and MFU against the peak."""
        cfg, config = self.grpo, self.policy.transformer.config
        tokens = self.policy.num_image_tokens(cfg.resolution, cfg.resolution)
        per_call = transformer_flops(config, tokens, tokens, self.policy.max_sequence_length)
        trained = len(select_train_steps(cfg.num_steps, fraction=cfg.timestep_fraction, window=cfg.sde_window))
        rollout_flops = per_call * samples * cfg.num_steps
        # forward + activation backward (~2x forward; frozen weights get no gradient), plus the reference forward
        update_flops = per_call * samples * trained * cfg.ppo_epochs * (2 + (cfg.kl_beta > 0))
        out = {"perf/rollout_tflops": rollout_flops / max(rollout_s, 1e-9) / 1e12,
               "perf/update_tflops": update_flops / max(update_s, 1e-9) / 1e12}  # fmt: skip
        peak = self.peak_tflops or _device_peak(self.device)
        if peak:
            out["perf/mfu"] = (rollout_flops + update_flops) / max(rollout_s + update_s, 1e-9) / 1e12 / peak
        return out

    def _rollout(
        self, conditions: Sequence[ConditionSample], group_size: int, noise_level: float, generator,
        num_steps: int | None = None,
    ):  # fmt: skip
        """Sample ``group_size`` trajectories per condition (``num_steps``: the training's unless given, e.g. 28 to
        evaluate; the SDE window applies to the training's step count only)."""
        cfg = self.grpo
        steps = num_steps or cfg.num_steps
        condition = self._condition(conditions, group_size)
        window = cfg.sde_window if steps == cfg.num_steps else None
        sde = sde_mask(steps, window) if noise_level > 0 else [False] * steps
        keep = gathered(self.policy.transformer) if cfg.rollout_keep_gathered else contextlib.nullcontext()
        with torch.no_grad(), keep:  # FSDP2: one all-gather per block for the whole rollout
            trajectory = rollout(
                self.policy, condition, num_steps=steps, noise_level=noise_level, group_size=group_size,
                sde_steps=sde, generator=generator, micro_batch_size=cfg.rollout_micro_batch_size, decode=True,
            )  # fmt: skip
        return condition, trajectory

    def _condition(self, conditions: Sequence[ConditionSample], group_size: int):
        """The batch's conditions: from precomputed shard entries when every condition has them (no text encoder or
        VAE encoder runs), else encoded by the policy."""
        cfg = self.grpo
        size = cfg.resolution
        if all(c.conditioning is not None for c in conditions):
            pre = [c.conditioning for c in conditions]
            self._check_precomputed(pre, conditions)
            return self.policy.condition_from_precomputed(
                torch.cat([p["prompt_embeds"] for p in pre]), torch.cat([p["pooled_prompt_embeds"] for p in pre]),
                torch.cat([p["image_latents"] for p in pre]), size, size, guidance=cfg.guidance, group_size=group_size,
            )  # fmt: skip
        return self.policy.condition(
            [c.reference for c in conditions], [c.prompt for c in conditions], size, size,
            guidance=cfg.guidance, group_size=group_size, reference_keys=[c.id for c in conditions],
        )  # fmt: skip

    def _check_precomputed(self, pre: list[dict], conditions: Sequence[ConditionSample]) -> None:
        want = {"resolution": self.grpo.resolution, "max_sequence_length": self.policy.max_sequence_length}
        for p, c in zip(pre, conditions):
            wrong = {k: p[k] for k, v in want.items() if p[k] != v}
            if wrong:
                raise ValueError(
                    f"identity {c.id!r}: its precomputed conditioning has {wrong}, this run needs {want}. Convert the "
                    f"shards again with `divrl data ... --precompute {self.policy_config.model} --resolution "
                    f"{want['resolution']} --max-sequence-length {want['max_sequence_length']}`, or set "
                    f"policy.text_encoders: true and drop the precomputed entries"
                )
            if p["model"] != self.policy_config.model and not self._warned_model:
                log.warning("precomputed conditioning of %r was made with model %r; training %r", c.id, p["model"],
                            self.policy_config.model)  # fmt: skip
                self._warned_model = True

    def _score(self, conditions: Sequence[ConditionSample], images: Tensor, group_size: int, reward=None):
        """Score each group; returns ``(rewards (n, G), keep (n,) bool, outputs of the kept groups)``."""
        reward = reward if reward is not None else self.reward
        rows, keep, outputs = [], [], []
        for i, c in enumerate(conditions):
            group = images[i * group_size : (i + 1) * group_size]
            try:
                out = reward(c.reference, group, c.mask)
            except ValueError as err:  # non-finite scores: the group is skipped and counted, never rewarded 0
                log.warning("skipping group %r (%r): %s", c.id, c.prompt, err)
                self.counters["skipped_groups"] += 1
                rows.append(torch.zeros(group_size))
                keep.append(False)
                continue
            rows.append(out.reward)
            keep.append(True)
            outputs.append(out)
        return torch.stack(rows).to(self.device), torch.tensor(keep, device=self.device), outputs

    def _advantages(self, rewards: Tensor, keep: Tensor) -> Tensor:
        cfg = self.grpo
        if cfg.adv_scope == "group":
            adv = torch.zeros_like(rewards)
            if keep.any():
                adv[keep] = group_advantages(rewards[keep], "group", clip=cfg.adv_clip)
            return adv
        # batch scope: statistics over the kept groups of every rank (skipped groups travel as NaN)
        masked = torch.where(keep[:, None], rewards, torch.full_like(rewards, float("nan")))
        gathered = self.all_gather(masked) if self.trainer.world_size > 1 else masked
        adv = pooled_advantages(rewards, gathered[~torch.isnan(gathered)], clip=cfg.adv_clip)
        return adv * keep[:, None]

    def _update(self, trajectory, condition, advantages: Tensor, keep: Tensor) -> dict[str, float]:
        """``ppo_epochs`` × ``updates_per_epoch`` optimizer steps over the rollout batch.

        Every rank runs the same sequence of backward calls (under DDP each one is a collective): samples of skipped
        groups stay in the batch with advantage 0 (they contribute no policy gradient), every loss is backpropagated,
        and an update is skipped by all ranks together when any rank saw a non-finite loss or gradient.
        """
        cfg = self.grpo
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        if not bool(keep.any()):
            log.warning("rollout %d: every group was skipped on this rank; its update carries no policy gradient",
                        self.rollouts_done)  # fmt: skip
        adv = advantages.flatten()
        samples = torch.arange(adv.numel(), device=adv.device)
        train_steps = select_train_steps(cfg.num_steps, fraction=cfg.timestep_fraction, window=cfg.sde_window)
        generator = torch.Generator().manual_seed(_mix(cfg.seed + 1, self.global_rank, self.rollouts_done))
        sums: dict[str, float] = defaultdict(float)
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = samples[torch.randperm(samples.numel(), generator=generator).to(samples.device)]
            for part in order.tensor_split(min(cfg.updates_per_epoch, order.numel())):
                stats = self._step(optimizer, scheduler, self._accumulate(trajectory, condition, adv, part, train_steps))
                if stats is not None:
                    updates += 1
                    for k, v in stats.items():
                        sums[k] += v
        return {k: v / updates for k, v in sums.items()} if updates else {}

    def _accumulate(self, trajectory, condition, adv: Tensor, part: Tensor, train_steps) -> dict[str, Tensor]:
        """Backward the loss of one update (micro-batches × timesteps); returns its statistics as 0-d tensors.

        Every loss is backpropagated, finite or not (a non-finite one poisons the gradient, which :meth:`_step`
        then refuses): the backward calls, DDP collectives, never depend on the data, and the statistics stay on the
        device (no host sync per micro-batch).
        """
        cfg = self.grpo
        micro_batches = part.split(cfg.micro_batch_size)
        count = len(micro_batches) * len(train_steps)
        sums: dict[str, Tensor] = {}

        def add(key: str, value: Tensor, mean: bool = True) -> None:
            """Accumulate a per-step value: its mean over the update (float64), or its maximum (``mean=False``)."""
            value = value.detach().double() / (count if mean else 1)
            sums[key] = value if key not in sums else (sums[key] + value if mean else torch.maximum(sums[key], value))

        for index in micro_batches:
            for step in train_steps:
                out = transition_log_prob(self.policy, trajectory, step, condition, index)
                loss, stats = grpo_loss(out.log_prob, trajectory.log_probs[index, step], adv[index], cfg.clip_range)
                add("train/policy_loss", loss)
                if cfg.kl_beta > 0:
                    with torch.no_grad(), self.policy.reference():
                        ref = transition_log_prob(self.policy, trajectory, step, condition, index)
                    kl = kl_divergence(out.mean, ref.mean, out.std).mean()
                    loss = loss + cfg.kl_beta * kl
                    add("train/kl", kl)
                self.manual_backward(loss / count)
                add("train/loss", loss)
                for k, v in stats.items():
                    add(f"train/{k}", v, mean=k != "ratio_max_dev")
        return sums

    def _step(self, optimizer, scheduler, sums: dict[str, Tensor]) -> dict[str, float] | None:
        """Clip and apply the accumulated gradient, unless the loss or the gradient is non-finite on any rank (then
        the update is skipped everywhere and counted). Returns the update's statistics, or ``None`` when skipped."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if _is_fsdp1(self.trainer.strategy):  # FSDP1 leaves the LoRA weights unwrapped: averaged here, as DDP would
            all_reduce_grads(params)
        norm = grad_norm(params)  # sharded gradients: a collective over the shards
        stats = {k: v.item() for k, v in sums.items()}  # the one host sync of the update
        finite = math.isfinite(stats["train/loss"]) and math.isfinite(norm.item())
        if not finite:
            log.warning("non-finite %s at rollout %d: update skipped", "loss" if not math.isfinite(stats["train/loss"])
                        else "gradient norm", self.rollouts_done)  # fmt: skip
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):  # any rank non-finite: all skip
            if finite:
                log.warning("update at rollout %d skipped: another rank had a non-finite loss", self.rollouts_done)
            self._skip(optimizer)
            return None
        if self.grpo.max_grad_norm is not None:  # by the norm computed above (sharded or not): no second pass
            torch.nn.utils.clip_grads_with_norm_(params, self.grpo.max_grad_norm, norm)
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
        if self._consecutive_skips >= self.grpo.max_consecutive_skips:
            raise FloatingPointError(
                f"{self._consecutive_skips} updates in a row had a non-finite loss or gradient; stopping instead of "
                f"training on garbage. Lower the learning rate, check the rewards, or raise grpo.max_consecutive_skips"
            )

    def _remember_group(self, conditions, images: Tensor, outputs: list[RewardOutput]) -> None:
        if not outputs:
            return
        c, out, g = conditions[0], outputs[0], self.grpo.group_size
        self.last_group = RolloutGroup(
            step=self.global_step, stage=self.stage, id=c.id, prompt=c.prompt, reference=c.reference,
            images=images[:g].detach().float().cpu(), reward=out.reward, nssm=out.nssm, vsm=out.vsm,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: ConditionBatch, batch_idx: int) -> None:
        """Deterministic (ODE) samples with fixed seeds per identity, scored by the current stage's reward."""
        cfg = self.grpo
        g = cfg.val_group_size
        generator = torch.Generator().manual_seed(_mix(cfg.seed + 2, self.global_rank, batch_idx))
        with self.policy_config.attention():
            _, trajectory = self._rollout(batch.conditions, g, 0.0, generator)
        _, _, outputs = self._score(batch.conditions, trajectory.images, g)
        self.log_dict(_reward_metrics(outputs, "val"), on_epoch=True, batch_size=len(batch), sync_dist=True)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights by their unwrapped names (this rank's shards under FSDP2); no collective."""
        return {name: p.detach() for name, p in trainable_parameters(self).items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = set(trainable_parameters(self))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["divrl"] = {"stage": self.stage, "rollouts_done": self.rollouts_done, "counters": dict(self.counters)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("divrl", {})
        self.stage = int(state.get("stage", 0))
        self.rollouts_done = int(state.get("rollouts_done", 0))
        self.counters = defaultdict(int, state.get("counters", {}))
        if self.policy is None:
            return
        check_trainable_keys(set(trainable_parameters(self)), set(checkpoint["state_dict"]))


def _device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def check_trainable_keys(trainable: set[str], saved: set[str], where: str = "checkpoint") -> None:
    """Refuse a checkpoint whose weights are not exactly this model's trainable ones, naming what differs."""
    if trainable != saved:
        missing, unexpected = sorted(trainable - saved), sorted(saved - trainable)
        raise KeyError(
            f"{where} does not match this model's trainable weights: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Resume with the same model.policy (model and "
            f"lora settings) as the run that wrote it"
        )


def check_strategy(strategy, policy: PolicyConfig | None = None) -> None:
    """Refuse, at start-up, strategies DivRL cannot train under, with the fix.

    - Lightning's own ``FSDPStrategy`` (``strategy: fsdp``) would wrap the whole module, frozen VAE, text encoders and
      reward backbones included, and flatten bf16 base and fp32 LoRA weights into one tensor; DivRL's
      :class:`~divrl.training.FSDP1Strategy` wraps the FLUX blocks only and leaves the LoRA weights unwrapped.
    - FSDP1 trains LoRA only; full fine-tuning shards with FSDP2.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    from divrl.training.strategies import FSDP1Strategy

    if isinstance(strategy, FSDPStrategy) and not isinstance(strategy, FSDP1Strategy):
        raise ValueError(
            "trainer.strategy: Lightning's FSDPStrategy (FSDP1) would wrap the whole DivRLModule; use "
            "trainer.strategy: {class_path: divrl.training.FSDP1Strategy} (FSDP1, LoRA left unwrapped) or "
            "{class_path: divrl.training.FSDP2Strategy} (see configs/demo_fsdp.yaml)"
        )
    if isinstance(strategy, FSDP1Strategy) and policy is not None and (policy.train_transformer or policy.lora is None):
        raise ValueError(
            "trainer.strategy: FSDP1Strategy trains a LoRA adapter on a frozen base; full fine-tuning "
            "(policy.train_transformer: true) shards with trainer.strategy: {class_path: divrl.training.FSDP2Strategy}"
        )


def _is_fsdp1(strategy) -> bool:
    from divrl.training.strategies import FSDP1Strategy

    return isinstance(strategy, FSDP1Strategy)


def check_optimizer_strategy(optimizer, strategy) -> None:
    """Refuse combinations known not to work, at start-up, with the fix (instead of a deep stack trace later).

    bitsandbytes' 8-bit optimizers index flat CUDA/CPU tensors and fail on FSDP2's DTensor parameters
    (``ModelParallelStrategy``, :class:`~divrl.training.FSDP2Strategy`); they run on one device and under DDP.
    torchao's ``AdamW8bit`` shards with FSDP2 (tests/test_distributed.py resumes it from a sharded checkpoint).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if type(optimizer).__module__.startswith("bitsandbytes") and isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"model.optimizer {type(optimizer).__name__} (bitsandbytes) does not support FSDP2's sharded DTensor "
            f"parameters (trainer.strategy: {type(strategy).__name__}, FSDP2). Use torchao's 8-bit AdamW "
            f"(torchao.optim.AdamW8bit, pip install torchao), which does, or bitsandbytes with trainer.strategy: ddp"
        )


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (seed, rank, index), stable across runs and Python versions."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + int(v) + 0x9E3779B9) % (2**63 - 1)
    return out


def _reward_metrics(outputs: Sequence[RewardOutput], prefix: str) -> dict[str, float]:
    if not outputs:
        return {}
    reward = torch.cat([o.reward for o in outputs])
    metrics = {f"{prefix}/mean": reward.mean().item(), f"{prefix}/std": reward.std(unbiased=False).item()}
    if prefix != "reward":
        metrics = {f"{prefix}/reward": metrics.pop(f"{prefix}/mean"), f"{prefix}/reward_std": metrics.pop(f"{prefix}/std")}
    if all(o.nssm is not None for o in outputs):
        metrics[f"{prefix}/nssm"] = torch.cat([o.nssm for o in outputs]).mean().item()
    if all(o.vsm is not None for o in outputs):
        metrics[f"{prefix}/vsm"] = torch.cat([o.vsm for o in outputs]).mean().item()
    metrics[f"{prefix}/gated_fraction"] = torch.cat([o.penalized for o in outputs]).float().mean().item()
    return metrics

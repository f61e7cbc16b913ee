"""What a :class:`~divrl.training.DivRLModule` offers its objective (:class:`~divrl.objectives.Environment`): rollouts,
skip-and-count scoring with one cross-rank agreement on reward errors, and cross-rank gathering; plus the reward
metrics and the record of a scored group the image logger draws."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from divrl.data.stream import ConditionSample
from divrl.objectives.base import Batch, SamplingConfig, Scores
from divrl.policy.flops import PEAK_TFLOPS
from divrl.rewards.base import Reward, RewardOutput
from divrl.training.scoring import GroupScoring, agreed, collect_scores, score_groups  # noqa: F401 - re-exported

__all__ = [
    "RunEnvironment",
    "RolloutGroup",
    "GroupScoring",
    "agreed",
    "score_groups",
    "collect_scores",
    "reward_metrics",
    "throughput",
    "device_peak",
    "end_of_run",
    "run_summary",
    "trains_on",
]

log = logging.getLogger(__name__)


class RunEnvironment:
    """The :class:`~divrl.objectives.Environment` of one training step of ``module``, scoring with ``reward``; it
    times the rollouts and the scoring (``timings``, seconds)."""

    def __init__(self, module, reward: Reward, sampling: SamplingConfig):
        self.module = module
        self.reward = reward
        self.sampling = sampling
        self.timings = {"rollout": 0.0, "reward": 0.0}

    def rollout(
        self, samples, group_size, generator, *, num_steps=None, noise_level=None, sde_steps=None, on_chunk=None
    ):
        start = self.module._clock()
        out = self.module._trajectories(
            samples,
            group_size,
            generator,
            num_steps=num_steps,
            noise_level=noise_level,
            sde_steps=sde_steps,
            on_chunk=on_chunk,
        )
        self.timings["rollout"] += self.module._clock() - start
        return out

    def score(self, samples: Sequence[ConditionSample], images: Tensor, group_size: int) -> Scores:
        start = self.module._clock()
        scores = score_groups(
            self.reward,
            samples,
            images,
            group_size,
            self.module.device,
            self.module._agree,
            self.module._count_skipped_group,
        )
        self.timings["reward"] += self.module._clock() - start
        return scores

    def rollout_and_score(self, samples, group_size, generator, *, noise_level=None, sde_steps=None):
        """:meth:`rollout` then :meth:`score`; with ``system.overlap_rewards`` each chunk's groups are scored while the
        next chunk rolls out, and this returns once every group is scored (the same scores, bit for bit). The
        ``reward`` timing is then the scoring left after the rollout (the part not hidden)."""
        if not self.module.system.overlap_rewards:
            condition, trajectory = self.rollout(
                samples, group_size, generator, noise_level=noise_level, sde_steps=sde_steps
            )
            return condition, trajectory, self.score(samples, trajectory.images, group_size)
        with GroupScoring(self.reward) as scoring:

            def on_chunk(rows: slice, images: Tensor) -> None:
                first = rows.start // group_size
                for i in range(images.shape[0] // group_size):
                    scoring.submit(samples[first + i], images[i * group_size : (i + 1) * group_size])

            condition, trajectory = self.rollout(
                samples, group_size, generator, noise_level=noise_level, sde_steps=sde_steps, on_chunk=on_chunk
            )
            start = self.module._clock()
            # every rank agrees on errors, those of the threads included: no rank is left alone in a collective
            scores = agreed(
                lambda: collect_scores(
                    self.reward,
                    samples,
                    scoring.results(),
                    group_size,
                    self.module.device,
                    self.module._count_skipped_group,
                ),
                self.module._agree,
                "the reward",
            )
        self.timings["reward"] += self.module._clock() - start
        return condition, trajectory, scores

    def all_gather(self, tensor: Tensor) -> Tensor:
        return self.module.all_gather(tensor) if self.module.trainer.world_size > 1 else tensor

    @property
    def step(self) -> int:
        return self.module.global_step


def trains_on(module, collected: Batch) -> bool:
    """Whether any rank has something to train on in ``collected``: a kept group (rewarded batches) and
    ``collected.usable`` conditions, pairs or groups (a target, a preference pair, a reward gap). A batch with nothing
    on any rank is not applied and counted (``train/empty_rollouts``); ``system.max_empty_rollouts`` of them in a row
    stop the run, saying what was missing. One collective for every scored or counted batch, on every rank."""
    unscored = collected.scores is not None and collected.scores.kept == 0
    if unscored:
        usable = 0
    elif collected.usable is not None:
        usable = collected.usable
    elif collected.scores is not None:
        usable = collected.scores.kept
    else:
        return (
            True  # an objective that neither scores nor counts: always trains (no collective: the same on every rank)
        )
    missing = (
        f"no group with a finite reward ({type(module.reward).__name__} returned non-finite scores for every group)"
        if unscored
        else collected.missing
    )
    if usable == 0:
        log.warning(
            "rollout %d: nothing to train on on this rank (%s); its update carries no gradient",
            module.rollouts_done,
            missing,
        )
    if module.trainer.strategy.reduce_boolean_decision(usable > 0, all=False):
        module._empty_rollouts = 0
        return True
    module.counters["empty_rollouts"] += 1
    module._empty_rollouts += 1
    module.empty_reason = missing
    if module._empty_rollouts >= module.system.max_empty_rollouts:
        raise RuntimeError(
            f"{module._empty_rollouts} rollouts in a row had {missing}, on every rank; stopping instead of training on "
            f"nothing{'. Check the reward and its scorer' if unscored else ''}, or raise system.max_empty_rollouts"
        )
    return False


def reward_metrics(outputs: Sequence[RewardOutput | None], prefix: str) -> dict[str, float]:
    """Mean and std of the rewards, the mean of every component all outputs have, and the gated fraction, over the
    scored groups; ``reward/...`` for training, ``val/reward``, ``val/<component>``... for validation."""
    outputs = [o for o in outputs if o is not None]
    if not outputs:
        return {}
    reward = torch.cat([o.reward for o in outputs])
    mean, std = ("mean", "std") if prefix == "reward" else ("reward", "reward_std")
    metrics = {f"{prefix}/{mean}": reward.mean().item(), f"{prefix}/{std}": reward.std(unbiased=False).item()}
    names = [n for n in outputs[0].components if all(n in o.components for o in outputs)]
    for name in names:
        metrics[f"{prefix}/{name}"] = torch.cat([o.components[name] for o in outputs]).mean().item()
    metrics[f"{prefix}/gated_fraction"] = torch.cat([o.gated for o in outputs]).float().mean().item()
    return metrics


def throughput(
    policy, collected: Batch, samples: int, rollout_s: float, update_s: float, peak: float | None, updated: bool = True
) -> dict[str, float]:
    """Achieved TFLOP/s of the rollout and the update (the policy's analytic FLOPs of the batch's network calls) and
    MFU against ``peak`` TFLOP/s; nothing when the policy has no FLOP count, no update FLOPs when the batch was not
    applied (``updated``)."""
    per_call = policy.flops_per_call(collected.condition) if collected.condition is not None else None
    if per_call is None:
        return {}
    rollout_flops = per_call * samples * collected.rollout_calls
    update_flops = per_call * samples * collected.update_calls if updated else 0.0
    out = {
        "perf/rollout_tflops": rollout_flops / max(rollout_s, 1e-9) / 1e12,
        "perf/update_tflops": update_flops / max(update_s, 1e-9) / 1e12,
    }
    if peak:
        out["perf/mfu"] = (rollout_flops + update_flops) / max(rollout_s + update_s, 1e-9) / 1e12 / peak
    return out


def device_peak(device: torch.device) -> float | None:
    """The dense bf16 peak TFLOP/s of a CUDA device, looked up by name in :data:`~divrl.policy.flops.PEAK_TFLOPS`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


@dataclass
class RolloutGroup:
    """One scored group, kept for image logging: the condition, its ``G`` images and their scores (CPU).

    Attributes:
        step: the optimizer step when it was generated.
        stage: the curriculum stage.
        sample: the condition (its references are drawn first).
        images: the ``G`` images.
        output: their reward and components.
    """

    step: int
    stage: int
    sample: ConditionSample
    images: Tensor
    output: RewardOutput


SKIPS = {
    "skipped_samples": "bad samples skipped",
    "skipped_groups": "groups skipped (non-finite reward)",
    "skipped_updates": "updates skipped (non-finite loss or gradient)",
    "empty_rollouts": "rollouts with nothing to train on, on any rank (not applied)",
}


def end_of_run(module) -> None:
    """At the end of ``fit``: one summary block (steps, time, where the exports, checkpoints and logs are, the last
    validation numbers, what was skipped: a warning when anything was), and an error (a non-zero exit) when every
    rollout of the run was skipped: it learned nothing."""
    counters, rollouts = module.counters, module.rollouts_done
    skipped = [f"{counters[key]} {what}" for key, what in SKIPS.items() if counters.get(key)]
    if module.global_rank == 0 and module._trainer is not None:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info("\n".join(run_summary(module._trainer, module)))
    if skipped and module.global_rank == 0:
        log.warning("divrl: %d rollouts, %d optimizer steps; %s", rollouts, module.global_step, "; ".join(skipped))
    for line in server_report(module):
        log.warning("divrl: %s", line)
    if rollouts and counters.get("empty_rollouts", 0) >= rollouts:
        check = (
            ". Check the reward and its scorer (e.g. `divrl score` on a few images)"
            if "finite reward" in module.empty_reason
            else ""
        )
        raise RuntimeError(
            f"every one of the run's {rollouts} rollouts was skipped (the last had "
            f"{module.empty_reason}): nothing was trained{check}"
        )


def server_report(module) -> list[str]:
    """The reward servers of ``module``'s rewards that failed during the run: when, and when they came back or that
    they did not (:meth:`~divrl.rewards.RemoteReward.report`)."""
    from divrl.rewards.endpoints import EndpointPool

    rewards = getattr(module, "rewards", None)
    pools = [
        part.pool
        for part in (rewards.modules() if rewards is not None else ())
        if isinstance(getattr(part, "pool", None), EndpointPool)
    ]
    return [line for pool in pools for line in pool.report()]


def run_summary(trainer, module, interrupted: bool = False) -> list[str]:
    """The lines of the end-of-fit summary (see :func:`end_of_run`); with ``interrupted``, those of a fit stopped by
    Ctrl-C: the steps done, the newest checkpoint (or that none was written and the steps are lost) and how to
    resume. A checkpoint folder is listed only when a checkpoint is in it."""
    import re
    import shlex
    import sys
    import time
    from pathlib import Path

    started = getattr(trainer, "fit_started", None)
    took = f" in {time.monotonic() - started:.0f} s" if started is not None else ""
    steps = trainer.global_step
    lines = [
        f"[divrl] fit {'interrupted after' if interrupted else 'ended:'} {steps} optimizer steps, "
        f"{module.rollouts_done} rollouts, stage {module.stage + 1}{took}"
    ]
    folders = [c for c in trainer.callbacks if type(c).__name__ == "ModelCheckpoint" and c.dirpath]
    for callback in trainer.callbacks:
        weights = Path(trainer.default_root_dir) / getattr(callback, "dirname", "")
        if type(callback).__name__ == "LoRAExporter" and (not interrupted or any(weights.glob("*/*"))):
            lines.append(f"  weights:     {weights}/ (load with `divrl sample --lora` or diffusers' load_lora_weights)")
    for callback in folders:
        found = [p for p in Path(callback.dirpath).glob("*.ckpt")] if "://" not in str(callback.dirpath) else [None]
        if found == [None]:  # a remote folder: not looked into
            lines.append(f"  checkpoints: {callback.dirpath}/ (resume with --ckpt_path last)")
            continue
        newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
        if newest is None:
            lost = f": the {steps} optimizer steps of this run are lost" if interrupted else ""
            lines.append(f"  checkpoints: none written (to {callback.dirpath}/){lost}")
            continue
        if not interrupted:
            lines.append(f"  checkpoints: {callback.dirpath}/ (newest {newest.name}; resume with --ckpt_path last)")
            continue
        saved = max(
            [
                getattr(callback, "_last_global_step_saved", 0) or 0,
                *(int(m[1]) for p in found if (m := re.search(r"step=(\d+)", p.name))),
            ]
        )
        lost = steps - saved
        after = f": {lost} optimizer step{'s' * (lost != 1)} after it will be lost" if lost else ", the last one done"
        after = f" (step {saved}{after})" if 0 < saved <= steps else ""
        lines.append(f"  checkpoints: newest {newest}{after}")
    if interrupted and not folders:
        lines.append(f"  checkpoints: none (no ModelCheckpoint callback): the {steps} optimizer steps are lost")
    resume = interrupted and any("checkpoints: newest" in line for line in lines)
    validation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if validation:
        lines.append("  validation:  " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(validation.items())))
    skipped = [f"{module.counters[key]} {what}" for key, what in SKIPS.items() if module.counters.get(key)]
    lines.append("  skipped:     " + ("; ".join(skipped) if skipped else "nothing"))
    for logger in trainer.loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            lines.append(f"  curves:      tensorboard --logdir {logger.log_dir}")
        elif getattr(logger, "log_dir", None):
            lines.append(f"  logs:        {logger.log_dir}")
    if resume:
        argv = sys.argv[1:]
        keep = [
            a for i, a in enumerate(argv) if not (a.startswith("--ckpt_path") or i and argv[i - 1] == "--ckpt_path")
        ]
        lines.append(
            f"  resume:      divrl {shlex.join(keep)} --ckpt_path last"
            if argv[:1] == ["fit"]
            else "  resume:      the same `divrl fit` command with --ckpt_path last"
        )
    return lines

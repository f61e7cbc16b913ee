"""Callbacks of a DivRL run: the Explore-and-Suppress stage switch, the adapter's moving average, rollout image grids,
and the export of the trained weights."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from divrl.images import caption_grid, to_image_batch
from divrl.policy.sharding import full_tensor, shard_like, trainable_parameters
from divrl.training.environment import RolloutGroup
from divrl.training.inputs import folder_problem

__all__ = ["LoRAExporter", "RolloutImageLogger", "StageSwitch", "DivRLProgressBar", "TrainTimeLimit", "group_grid"]


class StageSwitch(pl.Callback):
    """Explore-and-Suppress: train ``rewards[0]`` (R1 = nSSM) until ``switch_steps`` optimizer steps, then
    ``rewards[1]`` (R2 = gated), and so on; with one objective per stage (``model.objective`` a list), the objective
    switches too (e.g. SFT, then DPO). The LoRA and the optimizer state carry on across the switch.

    The active stage is module state saved in every checkpoint; this callback also saves the steps at which it
    switched, so a resumed run neither repeats nor misses a switch. Callbacks that define
    ``on_stage_switch(trainer, module, old_stage, new_stage)`` (e.g. :class:`LoRAExporter`) are told.

    Args:
        switch_steps: the ``global_step`` (optimizer updates) at which each stage after the first begins (the paper:
            200 updates of stage 1, see configs/explore.yaml). One int for the two-stage curriculum.
    """

    def __init__(self, switch_steps: int | list[int] = 200):
        super().__init__()
        steps = [switch_steps] if isinstance(switch_steps, int) else list(switch_steps)
        if not steps or any(s < 0 for s in steps) or steps != sorted(steps):
            raise ValueError(f"StageSwitch: switch_steps must be non-negative and ascending, got {switch_steps}")
        if len(set(steps)) < len(steps):
            raise ValueError(
                f"StageSwitch: switch_steps {switch_steps} repeat a step, so a stage would train no step; "
                f"give each stage its own, higher, start"
            )
        self.switch_steps = steps
        self.switched_at: dict[int, int] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        needed = len(self.switch_steps) + 1
        counts = {
            "rewards in model.rewards": len(pl_module.rewards),
            "objectives in model.objective": len(pl_module.objectives),
        }
        if all(n == 1 for n in counts.values()) or any(n not in (1, needed) for n in counts.values()):
            raise ValueError(
                f"StageSwitch: {len(self.switch_steps)} switch step(s) make {needed} stages, which take {needed} rewards "
                f"in model.rewards or {needed} objectives in model.objective (one per stage; a single one serves every "
                f"stage), got "
                f"{', '.join(f'{n} {what}' for what, n in counts.items())}"
            )
        max_steps = trainer.max_steps
        if stage == "fit" and max_steps is not None and 0 <= max_steps < self.switch_steps[-1]:
            # A warning, not a refusal: a run may stop early on purpose and be resumed with a higher max_steps.
            rank_zero_warn(
                f"trainer.max_steps {max_steps} ends this run before StageSwitch's switch_steps "
                f"{self.switch_steps[-1]}: stage {len(self.switch_steps) + 1} will not train in it. Resume with "
                f"--ckpt_path last and a higher trainer.max_steps to reach it (the paper: 400, switch at 200), or lower "
                f"switch_steps"
            )

    def stage_at(self, step: int) -> int:
        return sum(step >= s for s in self.switch_steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        target = self.stage_at(trainer.global_step)
        while pl_module.stage < target:
            old = pl_module.stage
            pl_module.stage = old + 1
            self.switched_at[pl_module.stage] = trainer.global_step
            rank_log(
                trainer,
                f"stage switch at step {trainer.global_step}: stage {old + 1} -> {pl_module.stage + 1} "
                f"({type(pl_module.reward).__name__}, {type(pl_module.objective).__name__})",
            )
            for callback in trainer.callbacks:
                hook = getattr(callback, "on_stage_switch", None)
                if hook is not None:
                    hook(trainer, pl_module, old, pl_module.stage)

    def state_dict(self) -> dict:
        return {"switch_steps": self.switch_steps, "switched_at": dict(self.switched_at)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.switched_at = {int(k): int(v) for k, v in state_dict.get("switched_at", {}).items()}


class TrainTimeLimit(pl.Callback):
    """Stop the run once its training steps have taken ``seconds`` (``time/train_s``: rollouts, rewards and updates,
    resumes included; validation and checkpoints excluded): equal compute budgets for comparing objectives
    (``benchmarks/objectives.py``). Every rank stops together (the slowest rank's clock decides).

    Args:
        seconds: the budget of training-step seconds.
    """

    def __init__(self, seconds: float):
        super().__init__()
        if not seconds > 0:
            raise ValueError(f"TrainTimeLimit: seconds must be > 0, got {seconds}")
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        spent = pl_module.counters["train_seconds"] >= self.seconds
        if trainer.strategy.reduce_boolean_decision(spent, all=False):
            trainer.should_stop = True


class AdapterEMA(pl.Callback):
    """An exponential moving average of the trainable (adapter) weights, as the published run keeps (decay 0.9,
    updated every 8 optimizer steps; its saved weights are the averaged ones).

    Every ``every_n_steps`` optimizer steps: ``ema ← ema + (1 − d)·(θ − ema)`` with ``d = decay``, or, with
    ``warmup``, ``d = min(decay, (1 + t) / (10 + t))`` at step ``t`` (the average follows the weights closely at
    first). The averaged weights are used for validation and exported by :class:`LoRAExporter`; training itself
    continues on the raw weights. Checked after each training step: with several updates per step the average
    sees the weights of the step's last update. The average is saved in checkpoints.

    Args:
        decay: the EMA decay (the published run: 0.9).
        every_n_steps: optimizer steps between updates (the published run: 8).
        warmup: use the warm-up decay above instead of a constant one.
    """

    def __init__(self, decay: float = 0.9, every_n_steps: int = 8, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0 or every_n_steps < 1:
            raise ValueError(f"AdapterEMA: need 0 <= decay < 1 and every_n_steps >= 1, got {decay}, {every_n_steps}")
        self.decay, self.every_n_steps, self.warmup = decay, every_n_steps, warmup
        self.shadow: dict[str, torch.Tensor] = {}
        self.last_step = 0

    def _params(self, pl_module) -> dict[str, torch.nn.Parameter]:
        return trainable_parameters(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        params = self._params(pl_module)
        if not self.shadow:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        else:  # restored from a checkpoint: whole tensors, laid out like the parameters (this rank's shard)
            self.shadow = {n: shard_like(t, params[n]) for n, t in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        params = self._params(pl_module)
        for step in range(self.last_step + 1, trainer.global_step + 1):
            if step % self.every_n_steps == 0:
                d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
                for name, p in params.items():
                    self.shadow[name].add_((1 - d) * (p.detach().float() - self.shadow[name]))
        self.last_step = trainer.global_step

    @contextlib.contextmanager
    def applied(self, pl_module):
        """The averaged weights in place of the raw ones, for the duration of the block."""
        params = self._params(pl_module)
        if not self.shadow:
            yield
            return
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation = self.applied(pl_module)
        self._validation.__enter__()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validation.__exit__(None, None, None)

    def state_dict(self) -> dict:
        # Whole tensors: sharded ones are gathered (every rank saves a checkpoint, so every rank takes part), and
        # only global rank 0, which writes the checkpoint's metadata, keeps them.
        import torch.distributed as dist

        keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        shadow = {}
        for name, tensor in self.shadow.items():
            whole = full_tensor(tensor)
            if keep:
                shadow[name] = whole.cpu()
        return {"shadow": shadow, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.last_step = int(state_dict["last_step"])


class LoRAExporter(pl.Callback):
    """Writes the trained weights (the adapter's moving average when :class:`AdapterEMA` is among the callbacks) through
    :meth:`divrl.policy.Policy.export` to ``<default_root_dir>/<dirname>/stage<k>/`` when stage ``k`` ends and to
    ``<default_root_dir>/<dirname>/final/`` when training ends, with an ``info.json`` (step, stage, base model). A LoRA
    is written in diffusers' format (``pytorch_lora_weights.safetensors``, loadable with the ``load_lora_weights`` of
    the family's diffusers pipeline); full fine-tuning writes the trained network as a diffusers model folder
    (``transformer/``).

    Args:
        dirname: folder under the trainer's ``default_root_dir``.
    """

    def __init__(self, dirname: str = "lora"):
        super().__init__()
        self.dirname = dirname

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # not at the end of training, when the weights are written
            writable(trainer, self, "exports")

    def export(self, trainer, pl_module, name: str, stage: int | None = None) -> Path | None:
        """Write the weights to ``<dirname>/<name>/`` with an ``info.json`` naming ``stage`` (1-based; default: the
        current one), the stage whose training the weights are the result of."""
        policy = pl_module.policy
        if policy is None or (policy.lora_config is None and not policy.train_transformer):
            return None
        ema = next((c for c in trainer.callbacks if isinstance(c, AdapterEMA)), None)
        directory = Path(trainer.default_root_dir) / self.dirname / name
        # Every rank gathers (with a sharded network, assembling the weights is a collective); rank 0 writes,
        # inside the block: on a CPU the gathered tensors may be the (averaged) parameters themselves.
        with ema.applied(pl_module) if ema is not None else contextlib.nullcontext():
            state = policy.export_state()
            if not trainer.is_global_zero:
                return None
            path = policy.export(directory, state)
        stage = pl_module.stage + 1 if stage is None else stage
        info = {
            "global_step": trainer.global_step,
            "stage": stage,
            "model": pl_module.policy_config.model,
            "ema": None if ema is None else {"decay": ema.decay, "every_n_steps": ema.every_n_steps},
        }
        (directory / "info.json").write_text(json.dumps(info, indent=2))
        rank_log(trainer, f"{'LoRA' if policy.lora_config is not None else 'weights'} written to {path}")
        return path

    def on_stage_switch(self, trainer, pl_module, old_stage: int, new_stage: int) -> None:
        self.export(trainer, pl_module, f"stage{old_stage + 1}", stage=old_stage + 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module, "final")


class RolloutImageLogger(pl.Callback):
    """Every ``every_n_rollouts`` rollouts, a grid of the first scored group — its references, then its ``G``
    samples, each labelled with the reward's components and the reward — to ``<default_root_dir>/<dirname>/rollout_<n>_step_<s>.png`` and to the
    active logger (TensorBoard ``add_image``, W&B ``log_image``).

    Args:
        every_n_rollouts: log the first rollout and then every this many.
        dirname: folder under the trainer's ``default_root_dir`` for the PNG files.
        tile: side of each tile in pixels (small images are upscaled with nearest neighbours).
        columns: tiles per row.
    """

    def __init__(self, every_n_rollouts: int = 10, dirname: str = "rollouts", tile: int = 160, columns: int = 8):
        super().__init__()
        bad = {
            name: value
            for name, value in (("every_n_rollouts", every_n_rollouts), ("tile", tile), ("columns", columns))
            if not (isinstance(value, int) and value >= 1)
        }
        if bad:
            raise ValueError(
                f"RolloutImageLogger: {', '.join(f'{k} {v!r}' for k, v in bad.items())}: must be a whole "
                f"number >= 1 (every_n_rollouts 1 logs every rollout)"
            )
        self.every_n_rollouts = every_n_rollouts
        self.dirname = dirname
        self.tile = tile
        self.columns = columns
        self.written: list[Path] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # not at the first rollout
            writable(trainer, self, "image grids")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        group = pl_module.last_group
        index = pl_module.rollouts_done - 1
        if group is None or index % self.every_n_rollouts or not trainer.is_global_zero:
            return
        grid = group_grid(group, self.tile, self.columns)
        directory = Path(trainer.default_root_dir) / self.dirname
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"rollout_{index:06d}_step_{group.step:06d}.png"
        grid.save(path)
        self.written.append(path)
        for logger in trainer.loggers:
            _log_image(logger, f"rollouts/stage{group.stage}", grid, trainer.global_step)


def writable(trainer, callback, what: str) -> None:
    """Refuse, when the run starts, a callback's ``dirname`` under ``trainer.default_root_dir`` that cannot be written
    to (a file in its place, a read-only file system): one sentence naming the callback and its ``dirname``."""
    if "://" in str(trainer.default_root_dir):  # a remote file system: not probed
        return
    folder = Path(trainer.default_root_dir) / callback.dirname
    problem = folder_problem(folder)
    if problem is not None:
        name = type(callback).__name__
        raise OSError(
            f"{name}: cannot write its {what} to {folder} ({problem}): set the callback's dirname "
            f"(init_args.dirname, now {callback.dirname!r}, under trainer.default_root_dir) to a folder "
            f"you can write to"
        )


def group_grid(group: RolloutGroup, tile: int = 160, columns: int = 8) -> Image.Image:
    """The condition's references and the group's images side by side, each image captioned with the reward's
    components and the reward (PIL image)."""
    references = [to_image_batch(r, "reference")[0] for r in group.sample.references]
    captions = [
        f"reference{f' {i + 1}' if len(references) > 1 else ''}  stage {group.stage + 1}"
        for i in range(len(references))
    ]
    out = group.output
    for k in range(group.images.shape[0]):
        parts = [f"{name} {value[k]:.2f}" for name, value in out.components.items()]
        captions.append(" ".join([*parts, f"R {out.reward[k]:.2f}"]))
    title = f"{group.sample.id}: {group.sample.prompt}"
    return caption_grid(title, references + list(group.images), captions, tile, columns)


def _log_image(logger, tag: str, image: Image.Image, step: int) -> None:
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard
        import numpy as np

        experiment.add_image(tag, torch.from_numpy(np.array(image)).permute(2, 0, 1), step)
    elif hasattr(logger, "log_image"):  # W&B and others
        logger.log_image(key=tag, images=[image], step=step)


def rank_log(trainer, message: str) -> None:
    """Log on global rank 0: above a live rich progress bar on a line of its own, else through Lightning's console
    logger."""
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    console = getattr(getattr(bar, "progress", None), "console", None)
    if console is not None and getattr(bar.progress, "live", None) is not None and bar.progress.live.is_started:
        console.print(f"[divrl] {message}", markup=False, highlight=False, soft_wrap=True)
    else:
        rank_zero_info(f"[divrl] {message}")


class DivRLProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled with what a divrl run counts: the stage and the optimizer step out of
    ``trainer.max_steps`` (``stage 2 · step 75/120``) instead of Lightning's epoch (``Epoch 11/-2`` without
    ``max_epochs``). The bar itself still fills per epoch of ``data.steps_per_epoch`` rollout batches."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer, module = self.trainer, self.trainer.lightning_module
        stage = getattr(module, "stage", 0) + 1
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        return f"stage {stage} · step {trainer.global_step}{total}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(0))
            self.refresh()

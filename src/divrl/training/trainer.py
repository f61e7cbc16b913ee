"""``DivRLTrainer``: Lightning's Trainer plus the ``sample`` and ``evaluate`` subcommands of the ``divrl`` CLI."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from divrl.data.datamodule import resolve_shards
from divrl.eval.suite import EvalSuite
from divrl.images import to_image_batch, to_pil
from divrl.policy.lora import LORA_FILE
from divrl.rewards.base import Group, RewardOutput
from divrl.training.callbacks import StageSwitch, group_grid
from divrl.training.checkpoints import (
    AtomicCheckpointIO,
    clean_partial,
    load_weights,
    resume_path,
    trainable_state_dict,
)
from divrl.training.environment import RolloutGroup, run_summary
from divrl.training.inputs import at_least_one as _at_least_one
from divrl.training.inputs import conditions as _conditions
from divrl.training.inputs import evaluate_inputs, sample_inputs, writable_folder
from divrl.training.inputs import sample_methods as _sample_methods
from divrl.training.module import DivRLModule
from divrl.utils import mix_seeds

__all__ = ["DivRLTrainer"]


class DivRLTrainer(pl.Trainer):
    """A Lightning Trainer with the ``sample`` and ``evaluate`` subcommands of the ``divrl`` CLI.

    Differences from ``pl.Trainer``:

    - a ``ModelCheckpoint`` without a ``dirpath`` writes to ``<default_root_dir>/checkpoints`` instead of the logger's
      versioned folder, so a restarted run finds its checkpoints with ``--ckpt_path last``;
    - checkpoint files are written next to their target and renamed into place
      (:class:`~divrl.training.checkpoints.AtomicCheckpointIO`), so a kill during a save never leaves a truncated one;
    - ``--ckpt_path last`` resumes from the newest *intact* checkpoint, and a damaged file is refused by name
      (:func:`~divrl.training.checkpoints.resume_path`);
    - a fit stopped by Ctrl-C says what was kept (the steps done, the newest checkpoint or that none was written) and
      how to resume, and Python's Ctrl-C handler is back afterwards (Lightning leaves it ignored).
    """

    def __init__(self, *args, **kwargs):
        _check_trainer_settings(kwargs)
        callbacks = kwargs.get("callbacks")
        if kwargs.get("enable_progress_bar") is False and isinstance(callbacks, list):  # a config's bar is dropped,
            kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, ProgressBar)]  # not a refusal
        try:
            super().__init__(*args, **kwargs)
        except MisconfigurationException as err:  # Lightning's sentence about a trainer setting, named by its key
            if asks_for_gpus(err):
                raise  # the console script points GPU configs on CPU machines to the demo
            keys = set(inspect.signature(pl.Trainer.__init__).parameters)
            text = re.sub(r"`Trainer\((\w+)=([^`]*)\)`", r"trainer.\1: \2", str(err))  # `Trainer(devices='0')`
            text = re.sub(r"`(\w+)`", lambda m: f"trainer.{m[1]}" if m[1] in keys else m[0], text)
            if "trainer.devices" in text:
                text = text.rstrip(". ") + (
                    "; give a number of devices >= 1, a list of device indices, -1 for all of them, or auto (with "
                    "trainer.accelerator cpu: a number of processes)"
                )
            raise ValueError(text) from None
        for callback in self.checkpoint_callbacks:
            if getattr(callback, "dirpath", "") is None:
                callback.dirpath = os.path.realpath(os.path.join(self.default_root_dir, "checkpoints"))
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not one the user chose
            self.strategy.checkpoint_io = AtomicCheckpointIO()

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders=None,
        val_dataloaders=None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Lightning's ``fit``; ``ckpt_path``: ``last`` (the newest intact checkpoint), ``hpc``, ``best``, or a
        checkpoint file or folder to resume from."""
        folders = [c.dirpath for c in self.checkpoint_callbacks if getattr(c, "dirpath", None)]
        if self.is_global_zero:
            for folder in folders:
                clean_partial(folder)
        ckpt_path = resume_path(ckpt_path, folders)
        stages = max(len(getattr(model, "rewards", [])), len(getattr(model, "objectives", [])))
        if stages > 1 and not any(isinstance(c, StageSwitch) for c in self.callbacks):
            raise ValueError(
                f"model.rewards / model.objective give {stages} stages but trainer.callbacks has no "
                f"divrl.training.StageSwitch to move between them: add one (init_args: {{switch_steps: "
                f"[...]}}), or give one reward and one objective"
            )
        if "://" not in str(self.default_root_dir):  # before Lightning's traceback at its first write there
            writable_folder(Path(self.default_root_dir), "trainer.default_root_dir")
        self.fit_started = time.monotonic()  # for the end-of-fit summary
        handler = signal.getsignal(signal.SIGINT)
        try:
            return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)
        except SystemExit:  # Lightning's exit after a Ctrl-C: say what was kept and how to resume
            if self.interrupted and self.is_global_zero:
                rank_zero_info("\n".join(run_summary(self, model, interrupted=True)))
            raise
        finally:
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(signal.SIGINT, handler)  # Lightning ignores a second Ctrl-C for good (a notebook's too)

    def validate(
        self,
        model: pl.LightningModule | None = None,
        dataloaders=None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: pl.LightningDataModule | None = None,
        weights_only: bool | None = None,
    ):
        """Lightning's ``validate``; ``ckpt_path`` is resolved and checked as ``fit``'s (a missing file, a LoRA export
        or a damaged file is refused by name)."""
        folders = [c.dirpath for c in self.checkpoint_callbacks if getattr(c, "dirpath", None)]
        ckpt_path = resume_path(ckpt_path, folders)
        if ckpt_path == "last":  # fit starts anew; validate would silently score the base model
            where = " or ".join(str(f) for f in folders) or f"{self.default_root_dir}/checkpoints"
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint in {where}; pass a run's checkpoint (or that run's "
                f"--trainer.default_root_dir), or drop --ckpt_path to validate the base model"
            )
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    @torch.no_grad()
    def sample(
        self,
        model: DivRLModule,
        datamodule: pl.LightningDataModule | None = None,
        reference: str | list[str] | None = None,
        prompts: list[str] | str | None = None,
        mask: str | list[str | None] | None = None,
        subjects: list[str] | None = None,
        lora: str | None = None,
        output_dir: str = "samples",
        num_samples: int = 4,
        num_steps: int = 28,
        noise_level: float = 0.0,
        seed: int = 0,
        num_identities: int = 4,
    ) -> Path:
        """Generate images for a reference and prompts (or for the first identities of the data) and write PNGs.

        Args:
            model: the configured model (``--config`` of the training run).
            datamodule: used when no ``reference`` is given: the first ``num_identities`` validation identities.
            reference: a reference image file, or a list of them: one per subject of a multi-subject model
                (``--reference '[dog.png, backpack.png]'``), placed as the policy's ``reference_positions`` says.
            prompts: edit prompts for ``reference`` (one prompt: a list of one, or the prompt itself).
            mask: optional subject mask of ``reference`` (the rewards of the grid's captions may use it), or one per
                reference (``null`` for none).
            subjects: the category word of each reference (``'[dog, backpack]'``), which multi-subject rewards
                detect the subjects by.
            lora: a trained adapter: a folder (or ``.safetensors`` file) written by the LoRA exporter, or a Lightning
                checkpoint (``.ckpt``, a file, or a folder written under FSDP2) of the run (its ``AdapterEMA``
                average when it has one, as the run's validation and exports); for full fine-tuning, the exported
                folder holding ``transformer/``.
                ``None`` samples the base model.
            output_dir: where ``<identity>/<prompt index>_<k>.png``, one grid per prompt, the references as
                ``<identity>/reference_<j>.png`` and ``samples.json`` (the files, the reward and its components per
                sample) go.
            num_samples: images per prompt (different seeds).
            num_steps: denoising steps (the paper evaluates with 28).
            noise_level: 0 for the deterministic sampler (evaluation); > 0 samples like training rollouts.
            seed: base seed of the initial noise.
            num_identities: identities taken from the data when no ``reference`` is given.

        Returns:
            The output folder.
        """
        _at_least_one(num_samples=num_samples, num_steps=num_steps, num_identities=num_identities)
        prompts = sample_inputs(reference, prompts, mask, subjects, lora, output_dir, noise_level)
        out = Path(output_dir)
        if (out / "samples.json").exists():  # before minutes of loading a model
            done = '"complete": false' not in (out / "samples.json").read_text(errors="replace")
            raise FileExistsError(
                f"--output_dir {out} already holds the samples.json of an earlier run"
                f"{'' if done else ' (stopped before it finished)'}; pass another --output_dir (or "
                f"delete that folder) so nothing is overwritten"
            )
        conditions = _conditions(datamodule, reference, prompts, mask, num_identities, subjects)  # before the model
        planned = [
            out / c.id / f"{i:03d}_{name}.png"
            for i, c in enumerate(conditions)
            for name in [*map(str, range(num_samples)), "grid"]
        ]
        taken = next((path for path in planned if path.exists()), None)
        if taken is not None:  # a user's files where this run writes (no samples.json: not an earlier divrl sample)
            raise FileExistsError(
                f"--output_dir {out} already holds {taken}, which this run would overwrite; pass "
                f"another --output_dir (or move that file)"
            )
        writable_folder(out, "--output_dir")
        model.configure_model()
        if lora is not None:
            load_weights(model, lora)
            _check_finite(model, lora, "--lora")
        model.to(self.strategy.root_device).eval()
        records = []
        meta = {
            "lora": lora,
            "stage": model.stage + 1,
            "reward": type(model.reward).__name__,
            "num_steps": num_steps,
            "noise_level": noise_level,
            "seed": seed,
            "complete": False,
            "samples": records,
        }
        for index, condition in enumerate(conditions):
            images, scores = sample_condition(model, condition, index, num_samples, seed, num_steps, noise_level)
            folder = out / condition.id
            folder.mkdir(parents=True, exist_ok=True)
            references = []  # what the samples were conditioned on (once per identity)
            for j, reference in enumerate(condition.references):
                references.append(str(folder / f"reference_{j}.png"))
                if not Path(references[-1]).exists():
                    pil = reference if isinstance(reference, Image.Image) else to_pil(to_image_batch(reference)[0])
                    pil.convert("RGB").save(references[-1])
            files = []
            for k, image in enumerate(images):
                path = folder / f"{index:03d}_{k}.png"
                to_pil(image).save(path)
                files.append(str(path))
            group_grid(RolloutGroup(0, model.stage, condition, images, scores)).save(folder / f"{index:03d}_grid.png")
            components = {name: value.tolist() for name, value in scores.components.items()}
            records.append(
                {
                    "id": condition.id,
                    "prompt": condition.prompt,
                    "files": files,
                    "references": references,
                    "reward": scores.reward.tolist(),
                    **components,
                }
            )
            _write_json(out / "samples.json", meta)  # after every group: no image the file does not list
        _write_json(out / "samples.json", {**meta, "complete": True})
        print(f"[divrl] wrote {sum(len(r['files']) for r in records)} images to {out}")
        return out

    @torch.no_grad()
    def evaluate(
        self,
        model: DivRLModule,
        suite: EvalSuite,
        datamodule: pl.LightningDataModule | None = None,
        methods: dict[str, str | None] | None = None,
        samples_dir: str | None = None,
        sample_methods: list[str] | None = None,
        output_dir: str = "eval",
        num_samples: int = 4,
        num_steps: int = 28,
        seed: int = 0,
        num_identities: int | None = None,
        prompts_per_identity: int | None = None,
        grid_conditions: int = 4,
        progress: bool = True,
    ) -> dict:
        """Score methods with the paper's metrics and write ``metrics.json``, ``table.md``, ``frontier.png`` and grids.

        Args:
            model: the configured model: its policy generates the samples (``--config`` of the training run).
            suite: the metrics and the models computing them (:class:`divrl.eval.EvalSuite`).
            datamodule: the identities: every (identity, prompt) of ``data.val_shards`` (or ``data.shards``).
            methods: methods to generate, ``name: weights``: a LoRA folder or ``.safetensors`` file, a ``.ckpt`` of
                a run, an exported full fine-tune, or ``null`` for the base model (adapter off). Default
                ``{base: null}``.
            samples_dir: a folder of samples other systems generated, in the DreamBench++ layout
                ``<samples_dir>/<method>/{src_image,text,tgt_image}/<id>/<prompt>_<k>.jpg``.
            sample_methods: which method folders of ``samples_dir`` to score (default: all of them).
            output_dir: where everything is written; a rerun resumes (see :mod:`divrl.eval.runner`).
            num_samples: samples per (identity, prompt), each from its own initial noise.
            num_steps: denoising steps of the deterministic sampler (the paper: 28).
            seed: base seed of the initial noise; every method sees the same noise per condition.
            num_identities: evaluate the first identities only (default: all).
            prompts_per_identity: the first prompts of each identity only (default: all).
            grid_conditions: identities shown in each method's ``grid.png`` (their first prompt each).
            progress: show progress bars.

        Returns:
            The metrics (as written to ``metrics.json``).
        """
        from divrl.eval import Evaluation, data_conditions, samples_layout

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                "divrl evaluate runs in one process (it writes one set of files); start it without torchrun/srun "
                "tasks > 1, with trainer.devices: 1"
            )
        _at_least_one(
            num_samples=num_samples,
            num_steps=num_steps,
            num_identities=num_identities,
            prompts_per_identity=prompts_per_identity,
        )
        evaluate_inputs(methods, samples_dir, sample_methods, output_dir, grid_conditions)
        evaluation = Evaluation(suite, output_dir, num_samples, seed, grid_conditions, progress)
        suite.to(self.strategy.root_device)
        conditions = None
        if datamodule is not None:
            shards = datamodule.val_shards if datamodule.val_shards is not None else datamodule.shards
            conditions = data_conditions(
                resolve_shards(shards, "data.val_shards"), num_identities, prompts_per_identity
            )
        methods = {"base": None} if methods is None and samples_dir is None else dict(methods or {})
        if methods and conditions is None:
            raise ValueError("generating samples needs identities: configure `data` (val_shards)")
        missing = {name: w for name, w in methods.items() if w is not None and not Path(w).exists()}
        if missing:  # before any work: a typo must not cost an hour of generation first
            raise FileNotFoundError(
                f"weights of method(s) {missing} do not exist; train first (the demo: `divrl fit "
                f"--config configs/demo.yaml` writes runs/demo/lora/stage1 and runs/demo/lora/final) or fix the path"
            )
        names = _sample_methods(samples_dir, sample_methods, methods) if samples_dir is not None else []
        writable_folder(Path(output_dir), "--output_dir")
        # the base model first: a full fine-tune loaded for another method would otherwise replace its weights
        for name, weights in sorted(methods.items(), key=lambda item: item[1] is not None):
            evaluation.run_method(
                name,
                conditions,
                self._eval_generator(model, weights, num_steps, f"methods.{name}"),
                meta=self._eval_meta(model, weights, num_steps),
            )
        if samples_dir is not None:
            categories = {c.id: c.category for c in conditions or [] if c.category}
            for name in names:
                evaluation.run_method(
                    name,
                    samples_layout(samples_dir, name, categories),
                    meta={"samples_dir": str(Path(samples_dir).resolve())},
                )
        metrics = evaluation.write_reports()
        print(f"[divrl] evaluation of {', '.join(metrics['methods'])} written to {output_dir}")
        print((Path(output_dir) / "table.md").read_text().split("\n## ")[0])
        return metrics

    def _eval_generator(self, model: DivRLModule, weights: str | None, num_steps: int, name: str):
        model.configure_model()
        if weights is not None:
            load_weights(model, weights)
            _check_finite(model, weights, name)
        model.to(self.strategy.root_device).eval()

        def generate(condition, num_samples: int, seed: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(seed)
            base = weights is None and model.policy.lora_config is not None
            with model.policy.adapter_disabled() if base else contextlib.nullcontext():
                return model.generate([condition.as_sample()], num_samples, generator, num_steps=num_steps)

        return generate

    @staticmethod
    def _eval_meta(model: DivRLModule, weights: str | None, num_steps: int) -> dict:
        return {
            "weights": None if weights is None else str(Path(weights).resolve()),
            "num_steps": num_steps,
            "weights_files": _stamp(weights),
            "model": str(model.policy_config.model),
            "resolution": model.sampling.resolution,
        }


_MANUAL = {
    "accumulate_grad_batches": (
        1,
        "objective.micro_batch_size and the objective's updates_per_epoch set how many samples each update sums",
    ),
    "gradient_clip_val": (None, "model.system.max_grad_norm clips every update (paper: 1.0)"),
}


def _check_trainer_settings(settings: dict) -> None:
    """Trainer settings divrl's manual optimization handles itself, refused with what sets them instead."""
    for key, (default, instead) in _MANUAL.items():
        if settings.get(key, default) not in (default, None) and not (
            key == "gradient_clip_val" and settings[key] == 0
        ):
            raise ValueError(
                f"trainer.{key} {settings[key]!r}: divrl optimizes manually and Lightning cannot do this "
                f"for it; {instead}"
            )
    callbacks = settings.get("callbacks") or []
    kinds = [type(c).__name__ for c in (callbacks if isinstance(callbacks, list) else [callbacks])]
    twice = sorted({kind for kind in kinds if kind in ("StageSwitch", "AdapterEMA") and kinds.count(kind) > 1})
    if twice:  # stateful: else Lightning's traceback about a callback's state_key
        raise ValueError(
            f"trainer.callbacks holds {', '.join(f'{kinds.count(k)} {k}' for k in twice)}; give one of each "
            f"(a StageSwitch takes every switch step in its switch_steps, e.g. [60, 120]); a config's "
            f"callbacks and --trainer.callbacks+=... add up"
        )
    if str(settings.get("precision") or "32-true") not in ("32", "32-true"):
        raise ValueError(
            f"trainer.precision {settings['precision']!r}: divrl sets its numerics itself (the frozen base "
            f"in policy.torch_dtype, the adapter's compute in policy.lora_compute_dtype, rewards in float32);"
            f" leave trainer.precision at 32-true"
        )


def asks_for_gpus(err: Exception) -> bool:
    """Whether Lightning refused the accelerator because this machine has no GPU (the console script points such a
    run to the demo)."""
    return any(word in str(err).lower() for word in ("gpu", "cuda"))


@torch.no_grad()
def sample_condition(
    model: DivRLModule,
    condition,
    index: int,
    num_samples: int,
    seed: int,
    num_steps: int,
    noise_level: float = 0.0,
) -> tuple[torch.Tensor, RewardOutput]:
    """``num_samples`` images of the ``index``-th condition of a ``divrl sample`` run with ``seed`` (its noise drawn
    from ``mix_seeds(seed, index)``), as float32 on the CPU, and their scores by the model's current reward: the one
    sampling step of ``divrl sample`` and ``divrl app``."""
    generator = torch.Generator().manual_seed(mix_seeds(seed, index))
    images = model.generate([condition], num_samples, generator, num_steps=num_steps, noise_level=noise_level)
    images = images.float().cpu()
    return images, model.reward(Group(condition, images))


def _check_finite(model: DivRLModule, weights: str, flag: str) -> None:
    """Refuse loaded weights that are not finite (a run that diverged exported NaN), naming their file: every image
    of them would be black or noise."""
    bad = next((name for name, p in trainable_state_dict(model).items() if not torch.isfinite(p).all()), None)
    if bad is not None:
        file = Path(weights) / LORA_FILE if (Path(weights) / LORA_FILE).is_file() else Path(weights)
        raise ValueError(
            f"{flag} {file}: its weights are not finite (NaN or inf in {bad}); the run that wrote them "
            f"diverged: export it again or pick another checkpoint (an earlier one)"
        )


def _write_json(path: Path, data: dict) -> None:
    """Write ``path`` beside itself and rename it into place: a kill never leaves half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2))
    partial.replace(path)


def _stamp(weights: str | None) -> list | None:
    """Size and modification time of the weights' files: retrained weights at the same path are new weights."""
    if weights is None:
        return None
    path = Path(weights)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [
        [str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns] for f in files
    ]

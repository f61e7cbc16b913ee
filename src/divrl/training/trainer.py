"""``DivRLTrainer``: Lightning's Trainer plus the ``sample`` subcommand of the ``divrl`` CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

from divrl.data.stream import ConditionSample
from divrl.images import to_pil
from divrl.training.callbacks import group_grid
from divrl.training.module import DivRLModule, RolloutGroup, _mix

__all__ = ["DivRLTrainer"]


class DivRLTrainer(pl.Trainer):
    """A Lightning Trainer with ``sample`` (``divrl sample``); ``evaluate`` joins with the evaluation suite.

    One difference from ``pl.Trainer``: a ``ModelCheckpoint`` without a ``dirpath`` writes to
    ``<default_root_dir>/checkpoints`` instead of the logger's versioned folder, so a restarted run finds its
    checkpoints with ``--ckpt_path last``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for callback in self.checkpoint_callbacks:
            if getattr(callback, "dirpath", "") is None:
                callback.dirpath = os.path.realpath(os.path.join(self.default_root_dir, "checkpoints"))

    @torch.no_grad()
    def sample(
        self,
        model: DivRLModule,
        datamodule: pl.LightningDataModule | None = None,
        reference: str | None = None,
        prompts: list[str] | None = None,
        mask: str | None = None,
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
            reference: a reference image file.
            prompts: edit prompts for ``reference``.
            mask: optional subject mask of ``reference`` (used for the nSSM / VSM captions of the grid).
            lora: a trained adapter: a folder (or ``.safetensors`` file) written by the LoRA exporter, or a Lightning
                checkpoint (``.ckpt``) of the run; for full fine-tuning, the exported folder holding ``transformer/``.
                ``None`` samples the base model.
            output_dir: where ``<identity>/<prompt index>_<k>.png``, one grid per prompt and ``samples.json`` go.
            num_samples: images per prompt (different seeds).
            num_steps: denoising steps (the paper evaluates with 28).
            noise_level: 0 for the deterministic sampler (evaluation); > 0 samples like training rollouts.
            seed: base seed of the initial noise.
            num_identities: identities taken from the data when no ``reference`` is given.

        Returns:
            The output folder.
        """
        model.configure_model()
        if lora is not None:
            _load_weights(model, lora)
        model.to(self.strategy.root_device).eval()
        conditions = _conditions(datamodule, reference, prompts, mask, num_identities)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for index, condition in enumerate(conditions):
            generator = torch.Generator().manual_seed(_mix(seed, index))
            with model.policy_config.attention():
                _, trajectory = model._rollout([condition], num_samples, noise_level, generator, num_steps)
            images = trajectory.images.float().cpu()
            folder = out / condition.id
            folder.mkdir(parents=True, exist_ok=True)
            files = []
            for k, image in enumerate(images):
                path = folder / f"{index:03d}_{k}.png"
                to_pil(image).save(path)
                files.append(str(path))
            scores = model.reward(condition.reference, images, condition.mask)
            grid = RolloutGroup(0, model.stage, condition.id, condition.prompt, condition.reference, images,
                                scores.reward, scores.nssm, scores.vsm)  # fmt: skip
            group_grid(grid).save(folder / f"{index:03d}_grid.png")
            records.append({"id": condition.id, "prompt": condition.prompt, "files": files,
                            "reward": scores.reward.tolist(),
                            "nssm": None if scores.nssm is None else scores.nssm.tolist(),
                            "vsm": None if scores.vsm is None else scores.vsm.tolist()})  # fmt: skip
        meta = {"lora": lora, "num_steps": num_steps, "noise_level": noise_level, "seed": seed, "samples": records}
        (out / "samples.json").write_text(json.dumps(meta, indent=2))
        print(f"[divrl] wrote {sum(len(r['files']) for r in records)} images to {out}")
        return out


def _conditions(datamodule, reference, prompts, mask, num_identities) -> list[ConditionSample]:
    from PIL import Image

    if reference is not None:
        if not prompts:
            raise ValueError("divrl sample: --reference needs at least one --prompts entry")
        ref = Image.open(reference).convert("RGB")
        subject_mask = Image.open(mask).convert("L") if mask is not None else None
        return [ConditionSample(Path(reference).stem, p, ref, subject_mask) for p in prompts]
    if datamodule is None:
        raise ValueError("divrl sample: give --reference and --prompts, or a data config to sample its identities")
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    conditions: list[ConditionSample] = []
    for batch in loader:
        for c in batch.conditions:
            for p in prompts or [c.prompt]:
                conditions.append(ConditionSample(c.id, p, c.reference, c.mask, c.category))
        if len({c.id for c in conditions}) >= num_identities:
            break
    ids = list(dict.fromkeys(c.id for c in conditions))[:num_identities]
    return [c for c in conditions if c.id in ids]


def _load_weights(model: DivRLModule, path: str) -> None:
    if str(path).endswith(".ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        model.on_load_checkpoint(checkpoint)
    elif (Path(path) / "transformer" / "config.json").is_file() or (Path(path) / "config.json").is_file():
        from diffusers import FluxTransformer2DModel  # a fully fine-tuned transformer (LoRAExporter, full FT)

        folder = Path(path) / "transformer" if (Path(path) / "transformer").is_dir() else Path(path)
        trained = FluxTransformer2DModel.from_pretrained(folder)
        model.policy.transformer.load_state_dict(trained.state_dict())
    else:
        model.policy.load_lora(path)

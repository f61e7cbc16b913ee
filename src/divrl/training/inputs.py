"""The input checks of :class:`~divrl.training.DivRLTrainer`'s commands (``divrl sample``, ``evaluate``, ``fit``) and of
the callbacks' folders: each refusal is one sentence naming the flag or setting and the fix, raised before a model is
loaded or a file is written."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from divrl.data.stream import ConditionSample
from divrl.eval.runner import method_name

__all__ = [
    "at_least_one",
    "writable_folder",
    "folder_problem",
    "sample_inputs",
    "evaluate_inputs",
    "sample_methods",
    "conditions",
]


def at_least_one(**flags: int | None) -> None:
    """Refuse counts below 1 (``None``: all), naming the flags, before anything is loaded."""
    bad = [f"--{flag} {value}" for flag, value in flags.items() if value is not None and value < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be at least 1")


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be written to, or ``None`` when it can: it is created (with its parents) and a probe file
    is written in it and removed. A file in its place, or in the place of one of its parents, is named."""
    blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file, not a folder"
    probe = folder / f".divrl-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


def writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` and write a probe file in it: a file in its place or a read-only file system is refused by
    the flag's name before a model is loaded."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{flag} {folder} is a file, not a folder; pass a folder (it is created if missing)")
    problem = folder_problem(folder)
    if problem is not None:
        raise OSError(f"cannot write to {flag} {folder} ({problem}); pass a folder on a writable file system")


def not_empty(**flags: str | None) -> None:
    """Refuse a folder or file flag given as an empty string (``--output_dir ""`` would write into the current
    folder)."""
    for flag, value in flags.items():
        if value is not None and not str(value).strip():
            raise ValueError(f"--{flag} is empty ({value!r}): pass a path (leave the flag out for its default)")


def sample_inputs(reference, prompts, mask, subjects, lora, output_dir, noise_level) -> list[str] | None:
    """Refuse ``divrl sample`` input that would fail late or be silently ignored; returns ``prompts`` as a list (a
    bare string is one prompt)."""
    not_empty(output_dir=output_dir)
    if lora is not None and not str(lora).strip():
        raise ValueError(
            f"--lora is empty ({lora!r}): pass a LoRA folder or .safetensors file (runs/demo/lora/final), "
            f"a run's .ckpt, or leave --lora out to sample the base model"
        )
    if not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(
            f"--noise_level {noise_level}: must be a finite number >= 0 (0: the deterministic sampler; "
            f"training rollouts use sampling.noise_level, 0.9 in the paper)"
        )
    if reference is None:
        for flag, value in (("--mask", mask), ("--subjects", subjects)):
            if value is not None:
                raise ValueError(
                    f"{flag} was given without --reference: it describes the --reference image(s); pass "
                    f"--reference (and --prompts) with it, or leave {flag} out to sample the data's "
                    f"identities"
                )
    return [prompts] if isinstance(prompts, str) else prompts


def evaluate_inputs(methods, samples_dir, sample_methods, output_dir, grid_conditions) -> None:
    """Refuse ``divrl evaluate`` input before anything is generated or written: method names that are not one plain
    folder name (they would write outside ``--output_dir``), nothing to evaluate, a negative ``--grid_conditions``."""
    not_empty(output_dir=output_dir)
    if grid_conditions < 0:
        raise ValueError(
            f"--grid_conditions {grid_conditions}: must be >= 0 (identities shown in each method's "
            f"grid.png; 0 for none)"
        )
    if methods is not None and not methods and samples_dir is None:
        raise ValueError(
            "--methods {} and no --samples_dir: nothing to evaluate; name a method (--methods "
            "'{base: null}' for the base model, '{mine: runs/x/lora/final}' for a LoRA) or pass "
            "--samples_dir"
        )
    for name in methods or {}:
        method_name(name, "--methods")
    for name in sample_methods or []:
        method_name(name, "--sample_methods")


def sample_methods(samples_dir: str, names: list[str] | None, generated=()) -> list[str]:
    """The method folders of ``samples_dir`` to score (``names``, default all), checked before anything is
    generated; a name also in ``generated`` (``--methods``) is refused: both would write the same folder."""
    root = Path(samples_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--samples_dir {samples_dir} is not a folder; pass the folder holding <method>/"
            f"{{src_image,text,tgt_image}}/<id>/<prompt>_<k>.jpg (the DreamBench++ layout)"
        )
    found = sorted(p.name for p in root.iterdir() if (p / "tgt_image").is_dir())
    missing = [name for name in names or [] if name not in found]
    if missing:
        raise FileNotFoundError(
            f"--sample_methods {missing} have no <method>/tgt_image folder in {samples_dir}; the methods there: {found}"
        )
    if not (names or found):
        raise FileNotFoundError(
            f"--samples_dir {samples_dir} holds no <method>/tgt_image folder; pass the folder "
            f"above the methods' folders (the DreamBench++ layout)"
        )
    chosen = [method_name(name, f"--samples_dir {samples_dir} method") for name in names or found]
    twice = sorted(set(chosen) & set(generated))
    if twice:
        raise ValueError(
            f"method(s) {twice} are named in --methods and in --samples_dir {samples_dir}: both would be "
            f"written to <output_dir>/<name>/; rename the --methods entry or pick others with "
            f"--sample_methods"
        )
    return chosen


def conditions(datamodule, reference, prompts, mask, num_identities, subjects=None) -> list[ConditionSample]:
    """The conditions ``divrl sample`` generates: the ``--reference`` image(s) with each of ``prompts``, or the first
    ``num_identities`` validation identities of the data (with ``prompts`` in place of theirs when given)."""
    from divrl.images import check_side, open_image

    if reference is not None:
        if not prompts:
            raise ValueError("--reference needs at least one --prompts entry")
        files = list(reference) if isinstance(reference, (list, tuple)) else [reference]
        masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] + [None] * (len(files) - 1)
        if len(masks) != len(files) or (subjects is not None and len(subjects) != len(files)):
            raise ValueError(
                f"{len(files)} --reference image(s), {len(masks)} --mask entries and "
                f"{'no' if subjects is None else len(subjects)} --subjects; give one mask (or null) and one "
                f"category word per reference"
            )
        # read as divrl data reads photos (upright, 16-bit scaled to 8, transparency on white), large enough to use
        refs = [open_image(f, "--reference", "RGB") for f in files]
        subject_masks = [open_image(m, "--mask", "L") if m is not None else None for m in masks]
        for flag, file, image in [
            *(("--reference", f, r) for f, r in zip(files, refs)),
            *(("--mask", m, k) for m, k in zip(masks, subject_masks) if k is not None),
        ]:
            check_side(image, f"{flag} {file}")
        for file, subject in zip(masks, subject_masks):
            if subject is not None and subject.point(lambda v: 255 if v >= 128 else 0).getbbox() is None:
                raise ValueError(
                    f"--mask {file} has no subject pixel (it is black: white marks the subject); pass the "
                    f"subject mask of its --reference, or leave --mask out to score without one"
                )
        identity = "_and_".join(Path(f).stem for f in files)
        metadata = {} if subjects is None else {"subjects": list(subjects)}
        return [ConditionSample(identity, p, refs, subject_masks, metadata=dict(metadata)) for p in prompts]
    if datamodule is None:
        raise ValueError("give --reference and --prompts, or a data config to sample its identities")
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    out: list[ConditionSample] = []
    for batch in loader:
        for c in (
            batch.conditions
        ):  # encoded from the images, as for --reference (precomputed shards may be of another size)
            out += [replace(c, prompt=p, conditioning=None) for p in prompts or [c.prompt]]
        if len({c.id for c in out}) >= num_identities:
            break
    ids = list(dict.fromkeys(c.id for c in out))[:num_identities]
    return [c for c in out if c.id in ids]

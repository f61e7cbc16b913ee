"""Every weight format in and out of a run.

- **Lightning checkpoints** hold the trainable weights only (the frozen base comes from the Hub): a single ``.ckpt``
  file, or under FSDP2 a distributed checkpoint folder (one file per rank). :func:`keep_trainable` trims what
  Lightning collected; :func:`check_trainable_keys` refuses a checkpoint of another adapter with the fix.
- **Exports** (written by :class:`~divrl.training.LoRAExporter` through :meth:`divrl.policy.Policy.export`): a LoRA in
  diffusers' format, or a full fine-tune's model folder.
- :func:`upgrade_hparams` reads the model settings of a checkpoint written before they were grouped by concern (one
  ``grpo`` group), so ``--ckpt_path`` resumes such a run.
- :func:`load_weights` reads any of them into a module, for ``divrl sample`` and ``divrl evaluate``: a run's
  checkpoint applies its moving average (:class:`~divrl.training.AdapterEMA`) when it has one, as the run's own
  validation and exports do.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn

from divrl.policy.sharding import trainable_parameters

__all__ = [
    "trainable_state_dict",
    "keep_trainable",
    "check_trainable_keys",
    "load_weights",
    "read_checkpoint",
    "upgrade_hparams",
    "optimizer_settings",
    "apply_optimizer_settings",
    "DCP_METADATA",
]

DCP_METADATA = "meta.pt"
"""Lightning's name for the non-tensor part of a distributed checkpoint folder."""


def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The trainable weights by their unwrapped names (this rank's shards under FSDP2); no collective."""
    return {name: p.detach() for name, p in trainable_parameters(module).items()}


def keep_trainable(checkpoint: dict, module: nn.Module) -> None:
    """Drop every frozen weight from a checkpoint's ``state_dict`` (in place)."""
    trainable = set(trainable_parameters(module))
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def check_trainable_keys(trainable: set[str], saved: set[str], where: str = "checkpoint") -> None:
    """Refuse a checkpoint whose weights are not exactly this model's trainable ones, naming what differs."""
    if trainable != saved:
        missing, unexpected = sorted(trainable - saved), sorted(saved - trainable)
        raise KeyError(
            f"{where} does not match this model's trainable weights: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Resume with the same model.policy (model and "
            f"lora settings) as the run that wrote it"
        )


def is_checkpoint(path: str | Path) -> bool:
    """A Lightning checkpoint of a run: a ``.ckpt`` file or a distributed (FSDP2) checkpoint folder."""
    return str(path).endswith(".ckpt") or (Path(path) / ".metadata").is_file()


def read_checkpoint(path: str | Path, module: nn.Module) -> dict:
    """A run's checkpoint, read in this one process: a ``.ckpt`` file, or a distributed checkpoint folder's trainable
    weights (every rank's shards, none of its optimizer state) and metadata."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {k: torch.empty_like(v) for k, v in trainable_state_dict(module).items()}}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent here
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    checkpoint = torch.load(path / DCP_METADATA, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def load_weights(module, path: str | Path) -> None:
    """Load trained weights into a configured :class:`~divrl.training.DivRLModule` (its policy built): a run's
    checkpoint (its :class:`~divrl.training.AdapterEMA` average when it has one), or an export (a LoRA folder or
    file, a full fine-tune's folder; :meth:`divrl.policy.Policy.load`)."""
    if not is_checkpoint(path):
        module.policy.load(path)
        info = Path(path) / "info.json" if Path(path).is_dir() else Path(path).with_name("info.json")
        if info.is_file():  # the exporter's record: the (1-based) stage these weights were trained in
            stage = json.loads(info.read_text()).get("stage")
            module.stage = max(0, int(stage) - 1) if isinstance(stage, int) else module.stage
        return
    checkpoint = read_checkpoint(path, module)
    module.on_load_checkpoint(checkpoint)  # first: settings its weights cannot take are refused by name, not by shape
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    average = next(
        (
            state["shadow"]
            for name, state in checkpoint.get("callbacks", {}).items()
            if name.startswith("AdapterEMA") and state.get("shadow")
        ),
        None,
    )
    if average is not None:  # the run's moving average: what its validation and its exported LoRA use
        module.load_state_dict(average, strict=False)


_SAMPLING = ("group_size", "num_steps", "noise_level", "resolution", "seed", "val_group_size")
_SYSTEM = ("rollout_micro_batch_size", "rollout_keep_gathered", "max_grad_norm", "max_consecutive_skips")


def moved_setting(key: str) -> str:
    """Where a setting of the former ``grpo`` group lives now (``"group_size"`` → ``"sampling.group_size"``), as
    :func:`upgrade_hparams` moves it."""
    if key == "guidance":
        return "policy.guidance"
    group = "sampling" if key in _SAMPLING else "system" if key in _SYSTEM else "objective.init_args"
    return f"{group}.{key}"


def upgrade_hparams(hparams: dict) -> dict:
    """A checkpoint's model settings in today's layout: the former ``grpo`` group (divrl before the seams) is split into
    ``sampling``, ``objective`` (Flow-GRPO's settings) and ``system``, its ``guidance`` moves to ``policy``. Settings in
    today's layout come back unchanged."""
    if not isinstance(hparams.get("grpo"), dict):
        return hparams
    hparams, grpo = dict(hparams), dict(hparams["grpo"])
    del hparams["grpo"]
    guidance = grpo.pop("guidance", None)
    policy = hparams.get("policy")
    if isinstance(policy, dict) and guidance is not None:
        if "init_args" in policy:
            hparams["policy"] = {**policy, "init_args": {"guidance": guidance, **policy["init_args"]}}
        else:
            hparams["policy"] = {"guidance": guidance, **policy}
    hparams["sampling"] = {k: grpo.pop(k) for k in _SAMPLING if k in grpo}
    hparams["system"] = {k: grpo.pop(k) for k in _SYSTEM if k in grpo}
    hparams["objective"] = {"class_path": "divrl.objectives.GRPOObjective", "init_args": grpo}
    return hparams


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, written to a temporary file next to the target and renamed over it: a kill during
    a save leaves the previous checkpoint whole, never a truncated one (a temporary folder on another file system
    could not be renamed into place), and stale temporary files of killed saves are removed by :func:`clean_partial`."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # a remote file system (s3://...): Lightning's own writer, through fsspec
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary name contains neither the target's name nor "hpc_ckpt_" / "last": Lightning finds SLURM's
        # newest hpc checkpoint by the digits of every name holding "hpc_ckpt_" in the folder.
        partial = path.with_name(f"{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


PARTIAL = ".divrl-partial-"
"""The start of the names of :class:`AtomicCheckpointIO`'s temporary files (``.divrl-partial-<pid>-<random>``)."""


def clean_partial(folder: str | Path) -> None:
    """Remove the temporary files killed saves left in ``folder``."""
    if "://" in str(folder) or not Path(folder).is_dir():
        return
    for stale in Path(folder).glob(f"{PARTIAL}*"):
        stale.unlink(missing_ok=True)


def intact(path: Path) -> bool:
    """Whether a checkpoint can be read: a folder (a sharded checkpoint) is taken as it is; a file must be a complete
    zip archive (what ``torch.save`` writes), every member's checksum right."""
    if path.is_dir():
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def resume_path(ckpt_path, folders: list[str]) -> str | None:
    """The checkpoint ``--ckpt_path`` should resume from: ``last`` is the newest intact ``last*.ckpt`` in ``folders``,
    else the newest intact checkpoint there (a warning names the damaged one); a damaged file given by path is refused,
    naming the newest intact one, and so are a path that does not exist and one that is no training checkpoint (a LoRA
    export). ``None``, ``hpc``, ``best``, ``registry[:...]``, remote paths and sharded checkpoint folders are returned
    unchanged, for Lightning to resolve."""
    if (
        ckpt_path is None
        or ckpt_path in ("hpc", "best")
        or "://" in str(ckpt_path)
        or str(ckpt_path).lower().split(":")[0] == "registry"
    ):
        return ckpt_path
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not path.exists():
            raise FileNotFoundError(
                f"--ckpt_path {ckpt_path} does not exist; pass a checkpoint of a run "
                f"(<default_root_dir>/checkpoints/*.ckpt), `last` for the newest one, or no "
                f"--ckpt_path to start anew"
            )
        inside = sorted(path.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
        if inside and not is_checkpoint(path):
            raise IsADirectoryError(
                f"--ckpt_path {ckpt_path} is a folder of checkpoints; pass one of them, e.g. "
                f"{inside[-1]} (the newest), or `last`"
            )
        if path.suffix == ".safetensors" or (path.is_dir() and not is_checkpoint(path)):
            raise ValueError(
                f"--ckpt_path {ckpt_path} is not a training checkpoint (it takes a .ckpt file or a sharded "
                f"checkpoint folder of a run, <default_root_dir>/checkpoints/); a LoRA or an exported "
                f"model is loaded by `divrl sample --lora {ckpt_path}` or `divrl evaluate --methods "
                f"'{{name: {ckpt_path}}}'`"
            )
        if path.is_dir():
            return ckpt_path  # a sharded checkpoint: as Lightning resolves it
    candidates = sorted(
        (p for folder in folders if "://" not in str(folder) for p in Path(folder).glob("*.ckpt")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if ckpt_path == "last":
        lasts = [p for p in candidates if p.name.startswith("last")]
        chosen = next((p for p in lasts if intact(p)), None)
        newest = None if chosen is not None else next((p for p in candidates if intact(p)), None)
        if chosen is None and newest is not None:
            what = f"{lasts[0]} is damaged (a save interrupted?)" if lasts else "there is no last.ckpt"
            warnings.warn(
                f"--ckpt_path last: {what}; resuming from {newest}, the newest intact checkpoint", stacklevel=2
            )
            chosen = newest
        if chosen is None and lasts:
            raise ValueError(
                f"--ckpt_path last: {lasts[0]} is damaged and no intact checkpoint is beside it; start "
                f"again without --ckpt_path"
            )
        return str(chosen) if chosen is not None else "last"
    if isinstance(ckpt_path, (str, Path)) and Path(ckpt_path).is_file() and not intact(Path(ckpt_path)):
        near = sorted(
            (p for p in Path(ckpt_path).parent.glob("*.ckpt") if intact(p)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        hint = f"; the newest intact checkpoint beside it is {near[0]}" if near else ""
        with open(ckpt_path, "rb") as file:
            head = file.read(4096)
        if head and not head.startswith(b"PK"):  # torch.save writes a zip archive; a cut-short one still starts so
            kinds = {
                b"\x89PNG": "a PNG image",
                b"\xff\xd8\xff": "a JPEG image",
                b"GIF8": "a GIF image",
                b"RIFF": "a WEBP image",
                b"\x80": "a pickle, not a zip archive",
            }
            kind = next((name for magic, name in kinds.items() if head.startswith(magic)), None)
            text = b"\0" not in head and head.decode("utf-8", "replace").count("\ufffd") <= 1
            kind = kind or ("a text file" if text else f"a file starting with {head[:4]!r}")
            raise ValueError(
                f"--ckpt_path {ckpt_path} is not a checkpoint at all (a checkpoint is a zip archive, as "
                f"torch.save writes it; this is {kind}): pass a .ckpt file of a run "
                f"(<default_root_dir>/checkpoints/), or `last` for the newest one{hint}"
            )
        raise ValueError(
            f"--ckpt_path {ckpt_path} is damaged (not a complete checkpoint: a save or copy that was cut short){hint}"
        )
    return ckpt_path


FIXED_SETTINGS = (
    "policy.lora",
    "policy.lora.rank",
    "policy.lora.alpha",
    "policy.lora.target_modules",
    "policy.train_transformer",
)
"""Model settings a resumed run cannot change: the trained weights belong to them. (``policy.model`` may: the same
weights from a Hub id or from a local folder; a different architecture fails on the weights' names and shapes.)"""


def _plain(value):
    """Settings as plain data: dataclasses and ``{class_path, init_args}`` mappings become dicts with a ``_class``
    entry (the class's name), tuples become lists."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "_class": type(value).__name__,
            **{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, dict):
        if "class_path" in value:
            return {"_class": str(value["class_path"]).rsplit(".", 1)[-1], **_plain(value.get("init_args") or {})}
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value  # numbers compare by value: alpha 16 and 16.0 are one setting


def _flat(value, prefix: str = "") -> dict:
    """Dotted keys of nested settings; a mapping's own key holds ``"<mapping>"`` (so ``lora: null`` against an
    adapter's settings differs at ``policy.lora``)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out = {prefix: "<mapping>"} if prefix else {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def compare_settings(saved: dict, current: dict, where: str = "the checkpoint") -> dict[str, tuple]:
    """On resume the command line's model settings apply. Returns the settings that differ from ``saved`` (the
    checkpoint's) as ``{key: (saved, current)}``, after refusing those no resumed run can change
    (:data:`FIXED_SETTINGS`: the weights belong to them). Settings only one side knows (a field added since) are
    not compared."""
    old, new = _flat(_plain(upgrade_hparams(dict(saved)))), _flat(_plain(dict(current)))
    for settings in (old, new):  # the order of the adapter's targets is no setting
        if isinstance(settings.get("policy.lora.target_modules"), list):
            settings["policy.lora.target_modules"] = sorted(settings["policy.lora.target_modules"])
    differ = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
    fixed = {k: v for k, v in differ.items() if k in FIXED_SETTINGS or k.startswith("policy.lora.")}
    fixed = {k: v for k, v in fixed.items() if not k.startswith(("policy.lora.init", "policy.lora.dropout"))}
    if fixed:
        listed = "; ".join(f"model.{k}: {a!r} in {where}, {b!r} now" for k, (a, b) in fixed.items())
        raise ValueError(
            f"loading {where} with settings its weights cannot take ({listed}); set them to the "
            f"checkpoint's values (in the config or on the command line), or, to train anew instead of "
            f"resuming, start without --ckpt_path"
        )
    return differ


def resumed_settings(checkpoint: dict, hparams, policy=None) -> None:
    """:func:`compare_settings` of a checkpoint being loaded against the run's settings; what differs (and may) is
    logged as a warning: the command line's values apply. A checkpoint written before ``policy.lora_compute_dtype``
    existed trained with float32 adapter compute: a warning says how to continue on those numerics."""
    saved = checkpoint.get("hyper_parameters")
    if not saved:
        return
    old_policy = _plain(upgrade_hparams(dict(saved)).get("policy") or {})
    if policy is not None and "lora_compute_dtype" not in old_policy and policy.compute_dtype != torch.float32:
        warnings.warn(
            f"the checkpoint predates policy.lora_compute_dtype: it trained with float32 adapter compute "
            f"and TF32 off; this run computes in {policy.compute_dtype}. To continue on the same numerics, "
            f"set model.policy.lora_compute_dtype: float32 and model.policy.tf32: false",
            stacklevel=2,
        )
    differ = compare_settings(saved, dict(hparams))
    if differ:
        listed = "; ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
        warnings.warn(
            f"model settings that differ from the checkpoint's; the command line's apply: {listed}", stacklevel=2
        )


def optimizer_settings(optimizer, scheduler=None) -> dict:
    """The settings a run configured: every param group's hyperparameters of the freshly built optimizer and the
    scalar settings of its scheduler (progress included, at its start), saved in the run's checkpoints so that a
    resumed run can tell which settings its command line changed (:func:`apply_optimizer_settings`)."""
    import copy

    groups = [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in optimizer.param_groups]
    schedule = (
        {}
        if scheduler is None
        else {
            k: v
            for k, v in scheduler.state_dict().items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))
        }
    )
    return {"groups": groups, "scheduler": schedule}


def apply_optimizer_settings(optimizer, scheduler, configured: dict, saved: dict | None) -> list[str]:
    """After a resume restored the checkpoint's optimizer and scheduler, re-apply the settings this run configured
    (``configured``) that differ from those the checkpoint's run configured (``saved``, both
    :func:`optimizer_settings`); returns what changed, as ``"model.optimizer lr: 0.0003 -> 0.0001"``. A new learning
    rate under a scheduler rescales the schedule: the current rate, the base rates (of every chained scheduler) and
    ``initial_lr`` are multiplied by new / old. ``saved`` is ``None`` when nothing was resumed; ``{}`` (a checkpoint
    that predates the record) compares the learning rate only, and only without a scheduler, whose rate moves."""
    if saved is None or (not saved and scheduler is not None):
        return []
    saved = saved or {
        "groups": [{"lr": group.get("initial_lr", group["lr"])} for group in optimizer.param_groups],
        "scheduler": {},
    }
    changes = []
    for index, (group, new, old) in enumerate(zip(optimizer.param_groups, configured["groups"], saved["groups"])):
        where = "model.optimizer" + (f" (param group {index})" if len(optimizer.param_groups) > 1 else "")
        for key, value in new.items():
            if key not in ("lr", "initial_lr") and key in old and key in group and _plain(old[key]) != _plain(value):
                changes.append(f"{where} {key}: {old[key]!r} -> {value!r}")
                group[key] = value
        lr, before = new.get("initial_lr", new["lr"]), old.get("initial_lr", old["lr"])
        if _plain(lr) == _plain(before):
            continue
        if scheduler is None or not before:
            changes.append(f"{where} lr: {before!r} -> {lr!r}")
            group["lr"] = lr
            continue
        ratio = float(lr) / float(before)
        changes.append(f"{where} lr: {before!r} -> {lr!r} (the schedule rescaled by {ratio:.6g})")
        group["lr"] = group["lr"] * ratio
        if "initial_lr" in group:
            group["initial_lr"] = lr
        for part in [scheduler, *getattr(scheduler, "_schedulers", [])]:  # SequentialLR, ChainedScheduler
            for name in ("base_lrs", "_last_lr"):
                if len(getattr(part, name, None) or []) > index:
                    getattr(part, name)[index] = getattr(part, name)[index] * ratio
    if scheduler is not None:
        for key, value in configured["scheduler"].items():
            if key in saved["scheduler"] and saved["scheduler"][key] != value:
                changes.append(f"model.lr_scheduler {key}: {saved['scheduler'][key]!r} -> {value!r}")
                setattr(scheduler, key, value)
    return changes

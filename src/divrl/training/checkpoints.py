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

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from divrl.policy.sharding import trainable_parameters

__all__ = ["trainable_state_dict", "keep_trainable", "check_trainable_keys", "load_weights", "read_checkpoint",
           "upgrade_hparams", "DCP_METADATA"]

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
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.on_load_checkpoint(checkpoint)
    average = next((state["shadow"] for name, state in checkpoint.get("callbacks", {}).items()
                    if name.startswith("AdapterEMA") and state.get("shadow")), None)
    if average is not None:  # the run's moving average: what its validation and its exported LoRA use
        module.load_state_dict(average, strict=False)


_SAMPLING = ("group_size", "num_steps", "noise_level", "resolution", "seed", "val_group_size")
_SYSTEM = ("rollout_micro_batch_size", "rollout_keep_gathered", "max_grad_norm", "max_consecutive_skips")


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

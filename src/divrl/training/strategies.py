"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` set up for DivRL (data parallel only), with sharded
checkpoints that hold the trainable weights alone.

Lightning's FSDP2 strategy saves a distributed checkpoint (a folder, one file per rank, written with
``torch.distributed.checkpoint``) and, on resume, asks for *every* weight of the model — the 12B frozen base
included, which a DivRL checkpoint leaves out on purpose (the base comes from the Hub; the checkpoint is the LoRA
and its optimizer state, a few hundred MB instead of 24 GB). This subclass reads back exactly the trainable weights
and the optimizer state, each rank its own shards, and hands the module the checkpoint's metadata as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

__all__ = ["FSDP2Strategy"]

_METADATA = "meta.pt"  # lightning's name for the non-tensor part of a distributed checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes: ``fully_shard`` per FLUX block (done by ``DivRLModule.configure_model``).

    Args:
        data_parallel_size: processes sharing the shards; ``"auto"``: all of them (nodes × devices).
        save_distributed_checkpoint: ``True`` writes each rank's shards (a checkpoint *folder*, no gathering);
            ``False`` gathers a single-file checkpoint on rank 0.
        **kwargs: passed to ``ModelParallelStrategy`` (``process_group_backend``, ``timeout``).
    """

    def __init__(self, data_parallel_size: int | str = "auto", save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)  # fmt: skip

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # Lightning's "auto" is one replica per node (TP inside); ours: all
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from divrl.training.module import check_trainable_keys

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():  # a single-file checkpoint (save_distributed_checkpoint=False)
            return super().load_checkpoint(path, weights_only=weights_only)
        model = self.model
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
        check_trainable_keys(set(weights), _saved_keys(path, "state_dict"), f"checkpoint {path}")  # before DCP's error
        state = {"state_dict": weights}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["state_dict"], options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: get_optimizer_state_dict(model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state[key])
        metadata = torch.load(path / _METADATA, weights_only=weights_only)
        metadata["state_dict"] = state["state_dict"]  # for LightningModule.on_load_checkpoint's key check
        return metadata


def _saved_keys(path: Path, prefix: str) -> set[str]:
    """The tensor names under ``prefix`` stored in a distributed checkpoint (from its metadata file)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    start = f"{prefix}."
    return {key[len(start) :] for key in metadata.state_dict_metadata if key.startswith(start)}

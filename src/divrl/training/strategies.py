"""DivRL's sharded strategies: ``FSDP2Strategy`` (Lightning's ``ModelParallelStrategy``, data parallel only) and
``FSDP1Strategy`` (Lightning's ``FSDPStrategy``, LoRA training), with checkpoints that hold the trainable weights alone;
how each shards a policy (:func:`shard_policy`), and the start-up checks of strategies and optimizers.

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
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from divrl.policy.sharding import shard_network, shard_network_fsdp1, trainable_parameters
from divrl.training.checkpoints import DCP_METADATA, check_trainable_keys

__all__ = [
    "FSDP1Strategy",
    "FSDP2Strategy",
    "shard_policy",
    "data_parallel_mesh",
    "check_strategy",
    "check_optimizer_strategy",
    "is_fsdp1",
]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes: ``fully_shard`` per unit of the policy's network (FLUX's blocks; :func:`shard_policy`).

    Args:
        data_parallel_size: processes sharing the shards; ``"auto"``: all of them (nodes × devices).
        save_distributed_checkpoint: ``True`` writes each rank's shards (a checkpoint *folder*, no gathering);
            ``False`` gathers a single-file checkpoint on rank 0.
        **kwargs: passed to ``ModelParallelStrategy`` (``process_group_backend``, ``timeout``).
    """

    def __init__(self, data_parallel_size: int | str = "auto", save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

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

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():  # a single-file checkpoint (save_distributed_checkpoint=False)
            return super().load_checkpoint(path, weights_only=weights_only)
        model = self.model
        trainable = set(trainable_parameters(model))
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
        metadata = torch.load(path / DCP_METADATA, weights_only=weights_only)
        metadata["state_dict"] = state["state_dict"]  # for LightningModule.on_load_checkpoint's key check
        return metadata


class FSDP1Strategy(FSDPStrategy):
    """FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) for LoRA training: each FLUX block's frozen
    base is one unit and the rest of the transformer the root unit around them, sharded over all processes; the LoRA
    weights are left unwrapped (``ignored_states``), whole on every rank (rank 0's initial values broadcast), with
    their gradients averaged like DDP's (:func:`shard_policy` wraps through
    :func:`~divrl.policy.sharding.shard_network_fsdp1`, ``DivRLModule`` averages the gradients through
    :func:`~divrl.policy.sharding.all_reduce_grads`). bitsandbytes' 8-bit optimizers work here: they only ever see the
    plain LoRA tensors. The dtypes stay as ``model.policy.torch_dtype`` loaded them (a bf16 base, fp32 adapters):
    Lightning's FSDP precision would cast the module to float32.

    Checkpoints are single files written by rank 0 (the trainable weights and optimizer state are the same on every
    rank, so there is nothing to shard), with the names an unsharded run uses; they resume under this strategy and
    load in ``divrl sample`` / ``divrl evaluate``. Runs on GPUs and, for tests, on CPU processes (gloo): Lightning's
    own ``FSDPStrategy`` accepts CUDA only, and FSDP1 on CPU needs the device given explicitly, which the wrapping
    here does. Full fine-tuning (every weight trains) shards with :class:`FSDP2Strategy`.

    Under ``FULL_SHARD`` each block is gathered again at every denoising step of a rollout (FSDP1 frees a non-root
    unit after every forward; ``system.rollout_keep_gathered`` is FSDP2's); ``SHARD_GRAD_OP`` keeps the blocks gathered
    from the rollout's first step to the backward pass, at the memory of the whole base on each GPU.

    Args:
        **kwargs: passed to Lightning's ``FSDPStrategy`` (``sharding_strategy``: ``FULL_SHARD`` (default),
            ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` (with a ``device_mesh`` or ``process_group``);
            ``process_group_backend``; ``timeout``) and, except Lightning's own, to every ``FullyShardedDataParallel``
            unit (``device_mesh``, ``limit_all_gathers``, ``backward_prefetch``, ``sync_module_states`` to broadcast
            rank 0's frozen weights when ranks could have loaded different ones, ...). ``state_dict_type`` is always
            ``"full"`` and ``use_orig_params`` always true. Not taken: ``auto_wrap_policy`` and the activation
            checkpointing options (the blocks are the units; ``policy.gradient_checkpointing`` recomputes them),
            ``cpu_offload``, and ``mixed_precision`` (the dtypes are ``policy.torch_dtype``'s).
    """

    def __init__(self, **kwargs):
        if kwargs.pop("state_dict_type", "full") != "full":
            raise ValueError(
                "FSDP1Strategy: state_dict_type must be 'full': the LoRA weights are not sharded, so "
                "checkpoints are single files (sharded checkpoints: divrl.training.FSDP2Strategy)"
            )
        if not kwargs.pop("use_orig_params", True):
            raise ValueError(
                "FSDP1Strategy: use_orig_params must be true (the optimizer and the LoRA export address "
                "the original parameters); remove it"
            )
        recompute = "set model.policy.gradient_checkpointing: full (or selective)"
        why = {
            "auto_wrap_policy": "each FLUX block is one unit",
            "activation_checkpointing": recompute,
            "activation_checkpointing_policy": recompute,
            "cpu_offload": "not supported here",
            "mixed_precision": "set model.policy.torch_dtype",
        }
        for name, fix in why.items():
            if kwargs.get(name):
                raise ValueError(f"FSDP1Strategy: {name} is not taken ({fix}); remove it")
        super().__init__(state_dict_type="full", **kwargs)

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return self._precision_plugin if self._precision_plugin is not None else _KeepDtypes("32-true")

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if type(plugin) is FSDPPrecision and plugin.precision == "32-true":  # Lightning's default for FSDP
            plugin = _KeepDtypes("32-true")
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def wrap_kwargs(self) -> dict[str, Any]:
        """What :func:`shard_policy` passes to each block's ``FullyShardedDataParallel`` (and ``device``)."""
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if precision not in ("32-true", "32"):
            raise ValueError(
                f"FSDP1Strategy: trainer.precision {precision!r} would cast the bf16 base and fp32 "
                f"adapters alike; leave trainer.precision at 32-true and set model.policy.torch_dtype"
            )
        extra = {k: v for k, v in self.kwargs.items() if k not in ("use_orig_params", "auto_wrap_policy")}
        return {**extra, "sharding_strategy": self.sharding_strategy, "device": self.root_device}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {name: p.detach() for name, p in trainable_parameters(self.lightning_module).items()}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return getattr(optimizer, "_optimizer", optimizer).state_dict()  # plain tensors, the same on every rank

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            raise FileNotFoundError(
                f"FSDP1Strategy: checkpoint {str(path)!r} is not a file (FSDP1 checkpoints are "
                f"single .ckpt files; a folder was written by FSDP2Strategy: resume with it)"
            )
        checkpoint = self.checkpoint_io.load_checkpoint(path, map_location="cpu", weights_only=weights_only)
        params = trainable_parameters(self.lightning_module)
        check_trainable_keys(set(params), set(checkpoint["state_dict"]), f"checkpoint {path}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(checkpoint["state_dict"][name])
        states = checkpoint.get("optimizer_states")
        if states is not None and self.lightning_module.trainer.state.fn == "fit":
            if len(states) != len(self.optimizers):
                raise RuntimeError(
                    f"checkpoint {path} has {len(states)} optimizer states for {len(self.optimizers)} "
                    f"optimizers; resume with the same model.optimizer"
                )
            for optimizer, state in zip(self.optimizers, states, strict=True):
                optimizer.load_state_dict(state)
        return checkpoint


class _KeepDtypes(FSDPPrecision):
    """FSDP1Strategy's 32-true precision: the module and the batches keep the dtypes ``model.policy.torch_dtype``
    gave them (a bf16 base, fp32 adapters, bf16 precomputed conditions). Lightning's would cast the whole module,
    frozen base and text encoders included, and every batch tensor to float32."""

    def convert_module(self, module):
        return module

    def convert_input(self, data):
        return data


def _saved_keys(path: Path, prefix: str) -> set[str]:
    """The tensor names under ``prefix`` stored in a distributed checkpoint (from its metadata file)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    start = f"{prefix}."
    return {key[len(start) :] for key in metadata.state_dict_metadata if key.startswith(start)}


# ---------------------------------------------------------------------------------------------------- sharding a policy


def data_parallel_mesh(device_mesh):
    """The 1-D data-parallel mesh of an FSDP2 run (``LightningModule.device_mesh``), or ``None`` without one."""
    if device_mesh is None:
        return None
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError("DivRLModule: tensor parallelism is not supported; use tensor_parallel_size: 1 (FSDP2)")
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


def shard_policy(policy, strategy, mesh, reference=None) -> None:
    """Shard the policy's network by its units (:meth:`divrl.policy.Policy.shard_units`) for the strategy: FSDP2
    (``mesh`` given) shards it, and full fine-tuning's frozen ``reference`` copy alike, with ``fully_shard``; FSDP1
    wraps each unit's frozen base and the network as the root unit, LoRA weights left whole. Other strategies: no-op."""
    if mesh is not None:
        shard_network(policy.network, policy.shard_units(), mesh)
        if reference is not None:
            shard_network(reference, policy.shard_units(reference), mesh)
    elif is_fsdp1(strategy):
        kwargs = strategy.wrap_kwargs()
        device = kwargs.pop("device")
        policy.wrap_network(lambda network: shard_network_fsdp1(network, policy.shard_units(network), device, **kwargs))


def is_fsdp1(strategy) -> bool:
    return isinstance(strategy, FSDP1Strategy)


def check_strategy(strategy, policy=None) -> None:
    """Refuse, at start-up, strategies DivRL cannot train under, with the fix.

    - Lightning's own ``FSDPStrategy`` (``strategy: fsdp``) would wrap the whole module, frozen VAE, text encoders and
      reward backbones included, and flatten bf16 base and fp32 LoRA weights into one tensor; DivRL's
      :class:`FSDP1Strategy` wraps the network's blocks only and leaves the LoRA weights unwrapped.
    - FSDP1 trains LoRA only; full fine-tuning shards with FSDP2.

    Args:
        strategy: the trainer's strategy (or ``None``).
        policy: the policy's settings (:class:`~divrl.policy.PolicyConfig`), or ``None``.
    """
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


def check_optimizer_strategy(optimizer, strategy) -> None:
    """Refuse combinations known not to work, at start-up, with the fix (instead of a deep stack trace later).

    bitsandbytes' 8-bit optimizers index flat CUDA/CPU tensors and fail on FSDP2's DTensor parameters
    (``ModelParallelStrategy``, :class:`FSDP2Strategy`); they run on one device, under DDP and under FSDP1. torchao's
    ``AdamW8bit`` shards with FSDP2 (tests/test_distributed.py resumes it from a sharded checkpoint).
    """
    if type(optimizer).__module__.startswith("bitsandbytes") and isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"model.optimizer {type(optimizer).__name__} (bitsandbytes) does not support FSDP2's sharded DTensor "
            f"parameters (trainer.strategy: {type(strategy).__name__}, FSDP2). Use torchao's 8-bit AdamW "
            f"(torchao.optim.AdamW8bit, pip install torchao), which does, or bitsandbytes with trainer.strategy: ddp"
        )

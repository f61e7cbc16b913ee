"""FSDP for a policy's network (plain torch, no Lightning): sharding, gathering for rollouts, full weights out.

The units come from the policy (:meth:`divrl.policy.Policy.shard_units`: FLUX's double- and single-stream blocks),
so nothing here knows a model family.

- :func:`shard_network` applies ``fully_shard`` to every unit (one all-gather per block), then to the network itself
  (the embedders and the output layers). The frozen base and the trainable LoRA weights of a block share one unit;
  mixed dtypes (a bf16 base with fp32 adapters) are all-gathered as they are. The VAE, the text encoders and the
  reward backbones are frozen and stay whole on every rank.
- :func:`shard_network_fsdp1` is the FSDP1 (``FullyShardedDataParallel``) counterpart for LoRA training: each unit's
  frozen base is one FSDP1 unit, the rest of the network the root unit around them; the LoRA weights are left out of
  every unit (``ignored_states``), so they stay whole on every rank like DDP's and keep their own dtype (FSDP1
  flattens a unit's parameters into one tensor of one dtype); :func:`all_reduce_grads` averages their gradients, as
  DDP would. The names of wrapped parameters gain FSDP1's ``_fsdp_wrapped_module.``; :func:`trainable_parameters`
  gives them without it.
- :func:`gathered` keeps the shards gathered across the denoising steps of a rollout: one all-gather per block
  per rollout instead of one per block per step (a 6-step rollout: 6× less all-gather traffic), for the price of
  the whole (bf16) network on each GPU while the rollout runs — the memory the backward pass never needs at once.
- :func:`full_tensor` / :func:`shard_like` turn a sharded ``DTensor`` into the full tensor (a collective: every rank
  must call it) and back. The LoRA export, the adapter moving average and full fine-tuning exports go through them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "shard_network",
    "shard_network_fsdp1",
    "gathered",
    "full_tensor",
    "shard_like",
    "save_full_network",
    "grad_norm",
    "all_reduce_grads",
    "trainable_parameters",
    "clean_name",
    "unwrapped",
]

_FSDP1_PREFIX = "_fsdp_wrapped_module."  # what FSDP1's wrapper inserts into the names of the parameters it wraps


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def shard_network(
    network: nn.Module, units: list[nn.Module], mesh, reshard_after_forward: bool = True
) -> list[nn.Module]:
    """``fully_shard`` each unit, then the network; returns the sharded modules (units first).

    Args:
        network: the policy's network (with or without a LoRA adapter).
        units: its repeated blocks (:meth:`divrl.policy.Policy.shard_units`).
        mesh: the 1-D data-parallel ``DeviceMesh`` (Lightning's ``ModelParallelStrategy``: ``device_mesh["data_parallel"]``).
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3); the backward pass
            gathers them again.
    """
    _, fully_shard = _fsdp()
    _check_units(network, units, "shard_network")
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return [*units, network]


def shard_network_fsdp1(network: nn.Module, units: list[nn.Module], device: torch.device, **fsdp_kwargs) -> nn.Module:
    """Shard the network's frozen weights with FSDP1 (``use_orig_params=True``): each unit is one FSDP1 unit (wrapped
    in place in its parent) and the network the root unit around them (the embedders and output layers). Returns the
    root unit, to use in place of ``network`` (attributes reach the network through it).

    One root matters: FSDP1 frees a unit's gathered weights after its forward only when it is not a root, so blocks
    wrapped side by side would all stay gathered from their first forward until the backward pass.
    The trainable (LoRA) weights are ``ignored_states``: whole on every rank (broadcast from rank 0 here, as DDP does),
    their gradients left to :func:`all_reduce_grads`. Frozen weights are moved to ``device`` unit by unit (never the
    whole network at once).

    Args:
        network: the policy's network with a LoRA adapter (its base frozen).
        units: its repeated blocks (:meth:`divrl.policy.Policy.shard_units`).
        device: this rank's device (``torch.device("cpu")`` runs FSDP1 on CPU processes with gloo).
        **fsdp_kwargs: passed to ``FullyShardedDataParallel`` (``sharding_strategy``, ``process_group``, ...).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    _check_units(network, units, "shard_network_fsdp1")
    if any(p.requires_grad for n, p in network.named_parameters() if "lora_" not in n):
        raise ValueError(
            "shard_network_fsdp1: the network's base weights are trainable (full fine-tuning); FSDP1 here "
            "shards a frozen base under LoRA only. Fully fine-tune with FSDP2 (divrl.training.FSDP2Strategy)"
        )
    adapters = [p for p in network.parameters() if p.requires_grad]
    for p in adapters:
        p.data = p.data.to(device)
    _broadcast(adapters)
    parents = {id(child): (parent, name) for parent in network.modules() for name, child in parent.named_children()}
    for unit in units:
        parent, name = parents[id(unit)]
        own = [p for p in unit.parameters() if p.requires_grad]
        setattr(
            parent,
            name,
            FullyShardedDataParallel(
                unit, device_id=device, use_orig_params=True, ignored_states=own or None, **fsdp_kwargs
            ),
        )
    return FullyShardedDataParallel(
        network, device_id=device, use_orig_params=True, ignored_states=adapters or None, **fsdp_kwargs
    )


def _broadcast(params: list[Tensor]) -> None:
    """Rank 0's values on every rank, for what FSDP1 does not manage: the adapters, whose random init differs between
    ranks launched with different seeds (DDP does the same when it wraps a model)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _check_units(network: nn.Module, units: list[nn.Module], caller: str) -> None:
    inside = {id(m) for m in network.modules()}
    if not units or any(id(u) not in inside or u is network for u in units):
        raise ValueError(
            f"{caller}: the units must be submodules of the {type(network).__name__} (its repeated blocks, from "
            f"policy.shard_units()); got {len(units)}"
        )


def unwrapped(module: nn.Module) -> nn.Module:
    """The module an FSDP1 root unit wraps (what :func:`shard_network_fsdp1` returns), else ``module`` itself."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return module.module if isinstance(module, FullyShardedDataParallel) else module


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model spells it (FSDP1's ``_fsdp_wrapped_module.`` removed)."""
    return name.replace(_FSDP1_PREFIX, "")


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by their unwrapped names (identical under no sharding, DDP, FSDP1 and FSDP2)."""
    return {clean_name(n): p for n, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def gathered(module: nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Within the block, FSDP2 units gather their shards on first use and keep them (no reshard after forward);
    on exit every unit is resharded and set back to ``reshard_after_forward`` (what :func:`shard_network` was
    given). A no-op for a module that is not sharded by FSDP2.

    FSDP1 has no such switch: a non-root FSDP1 unit frees its weights after every forward under ``FULL_SHARD``
    (``summon_full_params`` does not stop that), so a rollout gathers each block once per denoising step;
    ``sharding_strategy: SHARD_GRAD_OP`` keeps them gathered from the first forward until the next backward.
    """
    FSDPModule, _ = _fsdp()
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a (sharded) ``DTensor`` — a collective, every rank must call it — or ``tensor`` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` laid out as ``like``: this rank's shard when ``like`` is a ``DTensor`` (same mesh and placements),
    else ``full`` on ``like``'s device and dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(
        device=like.device if not isinstance(like, DTensor) else like.device_mesh.device_type, dtype=like.dtype
    )
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full


def save_full_network(network: nn.Module, state: Mapping[str, Tensor], directory: str | os.PathLike) -> Path:
    """Write a full (gathered) state dict of a diffusers model as its model folder (``config.json`` + safetensors
    shards of at most 10 GB + index), loadable with ``type(network).from_pretrained`` (``FluxTransformer2DModel``...)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    network.save_config(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def grad_norm(params) -> Tensor:
    """The global L2 norm of the parameters' gradients. Sharded (``DTensor``) gradients: each rank sums the squares
    of its shard and the sums are all-reduced over the shard's process group (every rank must call this); plain
    gradients (one device, or DDP's averaged copies) are reduced locally."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if any(isinstance(g, DTensor) for g in grads):
        squares = torch.stack([(g.to_local() if isinstance(g, DTensor) else g).float().square().sum() for g in grads])
        total = squares.sum()
        group = next(g for g in grads if isinstance(g, DTensor)).device_mesh.get_group()
        dist.all_reduce(total, group=group)
        return total.sqrt()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def all_reduce_grads(params, bucket_numel: int = 2**25) -> None:
    """Average the gradients of replicated parameters over all ranks, as DDP does (FSDP1 leaves its
    ``ignored_states`` to the caller), in buckets of at most ``bucket_numel`` elements (one float32 copy of a
    bucket at a time, 128 MB by default). Every rank must call it with the same parameters having gradients (the
    backward passes run the same graph on every rank). A no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buckets: list[list[Tensor]] = [[]]
    size = 0
    for grad in (p.grad for p in params if p.grad is not None):
        if buckets[-1] and size + grad.numel() > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += grad.numel()
    for bucket in filter(None, buckets):
        flat = torch.cat([g.reshape(-1).float() for g in bucket])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
            g.copy_(part.view_as(g))

"""FSDP for the FLUX transformer (plain torch, no Lightning): sharding, gathering for rollouts, full weights out.

- :func:`shard_transformer` applies ``fully_shard`` to every ``FluxTransformerBlock`` and
  ``FluxSingleTransformerBlock`` (one all-gather per block), then to the transformer itself (the embedders and the
  output layers). The frozen base and the trainable LoRA weights of a block share one unit; mixed dtypes (a bf16
  base with fp32 adapters) are all-gathered as they are. The VAE, the text encoders and the reward backbones are
  frozen and stay whole on every rank.
- :func:`shard_transformer_fsdp1` is the FSDP1 (``FullyShardedDataParallel``) counterpart for LoRA training: each
  block's frozen base is wrapped and sharded, its LoRA weights are left out of the unit (``ignored_states``), so
  they stay whole on every rank like DDP's and keep their own dtype (FSDP1 flattens a unit's parameters into one
  tensor of one dtype); :func:`all_reduce_grads` averages their gradients, as DDP would. The names of wrapped
  parameters gain FSDP1's ``_fsdp_wrapped_module.``; :func:`trainable_parameters` gives them without it.
- :func:`gathered` keeps the shards gathered across the denoising steps of a rollout: one all-gather per block
  per rollout instead of one per block per step (a 6-step rollout: 6× less all-gather traffic), for the price of
  the whole (bf16) transformer on each GPU while the rollout runs — the memory the backward pass never needs at
  once.
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
    "shard_transformer",
    "shard_transformer_fsdp1",
    "gathered",
    "full_tensor",
    "shard_like",
    "save_full_transformer",
    "grad_norm",
    "all_reduce_grads",
    "trainable_parameters",
    "clean_name",
]

_FSDP1_PREFIX = "_fsdp_wrapped_module."  # what FSDP1's wrapper inserts into the names of the parameters it wraps


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def shard_transformer(transformer: nn.Module, mesh, reshard_after_forward: bool = True) -> list[nn.Module]:
    """``fully_shard`` each transformer block, then the transformer; returns the sharded modules (blocks first).

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` (with or without a LoRA adapter).
        mesh: the 1-D data-parallel ``DeviceMesh`` (Lightning's ``ModelParallelStrategy``: ``device_mesh["data_parallel"]``).
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3); the backward pass
            gathers them again.
    """
    _, fully_shard = _fsdp()
    blocks = [block for _, _, block in _blocks(transformer, "shard_transformer")]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return [*blocks, transformer]


def shard_transformer_fsdp1(transformer: nn.Module, device: torch.device, **fsdp_kwargs) -> list[nn.Module]:
    """Wrap each transformer block's frozen weights in FSDP1 (``use_orig_params=True``), in place; returns the units.

    The trainable (LoRA) weights of a block are ``ignored_states`` of its unit: whole on every rank, their gradients
    left to :func:`all_reduce_grads`. Everything outside the blocks (embedders, output layers) is small and stays
    whole. Only the blocks' frozen weights are moved to ``device`` unit by unit (never the whole transformer at once).

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` with a LoRA adapter (its base frozen).
        device: this rank's device (``torch.device("cpu")`` runs FSDP1 on CPU processes with gloo).
        **fsdp_kwargs: passed to ``FullyShardedDataParallel`` (``sharding_strategy``, ``process_group``, ...).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    blocks = _blocks(transformer, "shard_transformer_fsdp1")
    inside = {id(p) for _, _, block in blocks for p in block.parameters()}
    if any(p.requires_grad for _, _, block in blocks for n, p in block.named_parameters() if "lora_" not in n):
        raise ValueError(
            "shard_transformer_fsdp1: the transformer's base weights are trainable (full fine-tuning); FSDP1 here "
            "shards a frozen base under LoRA only. Fully fine-tune with FSDP2 (divrl.training.FSDP2Strategy)"
        )
    replicated = [p for p in transformer.parameters() if id(p) not in inside or p.requires_grad]
    for p in replicated:  # the whole-on-every-rank part: outside the blocks, and the adapters
        p.data = p.data.to(device)
    _broadcast(replicated)
    for name, buffer in transformer.named_buffers():
        owner, _, leaf = name.rpartition(".")
        transformer.get_submodule(owner)._buffers[leaf] = buffer.to(device)
    units = []
    for container, index, block in blocks:
        adapters = [p for p in block.parameters() if p.requires_grad]
        unit = FullyShardedDataParallel(
            block, device_id=device, use_orig_params=True, ignored_states=adapters or None, **fsdp_kwargs
        )
        container[index] = unit
        units.append(unit)
    return units


def _broadcast(params: list[Tensor]) -> None:
    """Rank 0's values on every rank, for what FSDP1 does not manage (the adapters, whose random init differs between
    ranks launched with different seeds, and the parts outside the blocks), as DDP does when it wraps a model."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _blocks(transformer: nn.Module, caller: str) -> list[tuple[nn.ModuleList, int, nn.Module]]:
    """The FLUX blocks as ``(container, index, block)``, double-stream blocks first."""
    blocks = [
        (container, index, block)
        for container in (getattr(transformer, "transformer_blocks", None), getattr(transformer, "single_transformer_blocks", None))
        if container is not None
        for index, block in enumerate(container)
    ]
    if not blocks:
        raise ValueError(
            f"{caller}: {type(transformer).__name__} has no transformer_blocks / single_transformer_blocks; "
            f"expected a diffusers FluxTransformer2DModel"
        )
    return blocks


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model spells it (FSDP1's ``_fsdp_wrapped_module.`` removed)."""
    return name.replace(_FSDP1_PREFIX, "")


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by their unwrapped names (identical under no sharding, DDP, FSDP1 and FSDP2)."""
    return {clean_name(n): p for n, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def gathered(module: nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Within the block, FSDP2 units gather their shards on first use and keep them (no reshard after forward);
    on exit every unit is resharded and set back to ``reshard_after_forward`` (what :func:`shard_transformer` was
    given). FSDP1 units are gathered on entry (``summon_full_params``, read-only: for no-grad rollouts) and
    resharded on exit. A no-op for a module that is not sharded."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        if torch.is_grad_enabled():
            raise RuntimeError("gathered: FSDP1 units stay gathered for no-grad forwards only (rollouts)")
        with FullyShardedDataParallel.summon_full_params(module, writeback=False):
            yield
        return
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

    full = full.to(device=like.device if not isinstance(like, DTensor) else like.device_mesh.device_type, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full


def save_full_transformer(transformer: nn.Module, state: Mapping[str, Tensor], directory: str | os.PathLike) -> Path:
    """Write a full (gathered) transformer state dict as a diffusers model folder (``config.json`` + safetensors
    shards of at most 10 GB + index), loadable with ``FluxTransformer2DModel.from_pretrained``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer.save_config(directory)
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


def all_reduce_grads(params) -> None:
    """Average the gradients of replicated parameters over all ranks, as DDP does (FSDP1 leaves its
    ``ignored_states`` to the caller): one flat all-reduce. Every rank must call it with the same parameters having
    gradients (the backward passes run the same graph on every rank). A no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))

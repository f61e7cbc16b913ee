"""The KL reference of full fine-tuning: a frozen copy of the initial network, resident or streamed block by block.

With a LoRA the reference policy is the same network with the adapter off (:func:`divrl.policy.lora.adapter_disabled`,
no copy). Full fine-tuning trains every weight, so the reference must be a copy of the network as it was before
training. :class:`FrozenReference` keeps that copy out of the module tree (never trained, saved or moved by ``.to()``)
and, with ``offload``, on the CPU: during the reference forward each block is copied to the device only for its own
forward (:func:`streamed`), so the device holds one block of it at a time.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FrozenReference", "streamed"]


class FrozenReference:
    """A frozen copy of ``network`` as it is now, in its dtype (so the first update's KL is exactly 0).

    Args:
        network: the network to copy (its current weights are the reference).
        offload: keep the copy on the CPU (pinned when CUDA is available, for asynchronous copies) and stream it
            through the device block by block during the reference forward.
    """

    def __init__(self, network: nn.Module, offload: bool = False):
        self.module = copy.deepcopy(network).requires_grad_(False).eval()
        self.offload = offload
        if offload:
            self.module.to("cpu")
            if torch.cuda.is_available():  # pinned pages: the per-block copies to the GPU run asynchronously
                for t in [*self.module.parameters(), *self.module.buffers()]:
                    t.data = t.data.pin_memory()

    def on(self, device: torch.device, blocks: Sequence[nn.Module]):
        """A context in which the copy can run on ``device``: streamed block by block when offloaded (``blocks``:
        its repeated blocks), as it is otherwise."""
        return streamed(self.module, device, blocks) if self.offload else contextlib.nullcontext()


@contextlib.contextmanager
def streamed(network: nn.Module, device: torch.device, blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Run a CPU-resident network on ``device``: its small top-level parts move for the duration of the block, each of
    ``blocks`` only for its own forward (hooks), so the device holds one block at a time. A block's weights are copied
    to the device before its forward and simply dropped after it (the CPU copies stay where they are: nothing is
    copied back), also when the forward raises."""
    block_ids = {id(b) for b in blocks}
    rest = [m for m in network.children() if not isinstance(m, nn.ModuleList) and id(m) not in block_ids]
    on_cpu: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def arrive(module: nn.Module, args) -> None:
        tensors = [*module.parameters(), *module.buffers()]
        on_cpu[id(module)] = [(t, t.data) for t in tensors]
        for t in tensors:
            t.data = t.data.to(device, non_blocking=True)

    def leave(module: nn.Module, args=None, output=None) -> None:
        for t, data in on_cpu.pop(id(module), []):
            t.data = data

    hooks = [
        hook
        for block in blocks
        for hook in (block.register_forward_pre_hook(arrive), block.register_forward_hook(leave))
    ]
    for module in rest:
        module.to(device)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for block in blocks:  # a forward that raised left its block on the device
            leave(block)
        for module in rest:
            module.to("cpu")

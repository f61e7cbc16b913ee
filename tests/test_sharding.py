"""FSDP1 helpers of divrl.policy.sharding in two CPU processes (gloo), on a toy transformer with FLUX's block layout,
checked against an unsharded copy: rank 0's adapters reach every rank, gradients are averaged as DDP would, blocks
are resharded after their forward (one root unit) unless ``SHARD_GRAD_OP`` keeps them, and names are the unwrapped
model's."""

from __future__ import annotations

import copy
import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(8, 8).requires_grad_(False)  # the frozen weights FSDP1 shards
        self.lora_A = nn.Linear(8, 2, bias=False)  # the adapter it leaves unwrapped
        self.lora_B = nn.Linear(2, 8, bias=False)

    def forward(self, x):
        return torch.tanh(x + self.base(x) + self.lora_B(self.lora_A(x)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8).requires_grad_(False)
        self.transformer_blocks = nn.ModuleList([Block(), Block()])
        self.single_transformer_blocks = nn.ModuleList([Block()])

    def units(self) -> list[nn.Module]:
        """What a policy's shard_units gives: the repeated blocks."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def forward(self, x):
        x = self.embed(x)
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            x = block(x)
        return x


class Unit(nn.Module):
    """A block for peft's own LoRA layers (``proj``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.proj(x))


def inputs(rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(100 + rank))


def worker(rank: int, port: int) -> None:
    import torch.distributed.fsdp._flat_param as flat
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from divrl.policy.sharding import (
        all_reduce_grads,
        gathered,
        shard_network_fsdp1,
        trainable_parameters,
    )

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = Toy()  # the same frozen weights on every rank, as loaded from one checkpoint
        torch.manual_seed(1 + rank)  # adapters initialised differently on each rank (ranks seeded apart)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data.normal_()
        own = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        reference = copy.deepcopy(model)

        model = shard_network_fsdp1(model, model.units(), torch.device("cpu"))
        params = trainable_parameters(model)
        assert sum(isinstance(m, FullyShardedDataParallel) for m in model.modules()) == 4  # 3 blocks + the root
        assert set(params) == {n for n, p in reference.named_parameters() if p.requires_grad}
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, {n: p.detach().clone() for n, p in params.items()})
        for name, value in params.items():  # rank 0's adapters everywhere; rank 1's own init was replaced
            assert torch.equal(value, everyone[0][name]) and torch.equal(everyone[1][name], everyone[0][name])
            assert torch.equal(value, own[name]) == (rank == 0)
        reference.load_state_dict({n: p.detach() for n, p in params.items()}, strict=False)

        calls = {"n": 0}
        real = flat.FlatParamHandle._all_gather_flat_param

        def counting(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        flat.FlatParamHandle._all_gather_flat_param = counting
        # gradients: each rank's own data, averaged over ranks = the mean of the unsharded model's gradients. The
        # blocks free their weights after the forward and gather them again in the backward (the root keeps its own)
        model(inputs(rank)).square().sum().backward()
        assert calls["n"] == 4 + 3
        all_reduce_grads(list(params.values()), bucket_numel=20)  # several buckets (adapters of 16 elements)
        for r in range(WORLD):
            (reference(inputs(r)).square().sum() / WORLD).backward()
        ref_params = dict(reference.named_parameters())
        for name, p in params.items():
            torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-6, rtol=1e-5)

        # no-grad forwards (rollouts): under FULL_SHARD each forward gathers every block again (gathered() cannot
        # keep FSDP1 units and leaves them alone), the root once; the unsharded model's outputs
        x = inputs(rank)
        with torch.no_grad():
            calls["n"] = 0
            with gathered(model):
                outs = [model(x), model(x)]
            assert calls["n"] == 1 + 2 * 3, calls
            assert all(torch.allclose(out, reference(x), atol=1e-6) for out in outs)

        # SHARD_GRAD_OP (passed through to every unit) keeps each unit gathered from its first forward to the backward
        torch.manual_seed(0)
        toy = Toy()
        zero2 = shard_network_fsdp1(
            toy, toy.units(), torch.device("cpu"), sharding_strategy=ShardingStrategy.SHARD_GRAD_OP
        )
        calls["n"] = 0
        with torch.no_grad():
            zero2(x), zero2(x), zero2(x)
        zero2(x).square().sum().backward()
        assert calls["n"] == 4, calls

        # the adapter's state by the unwrapped names, from a peft LoRA under FSDP1 (the names a LoRA export writes;
        # peft 0.22 and earlier versions strip FSDP1's wrapper names from different levels)
        from peft import LoraConfig, inject_adapter_in_model

        from divrl.policy.lora import adapter_state

        torch.manual_seed(0)
        peft_toy = nn.Sequential(*[Unit() for _ in range(3)])
        peft_toy = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"]), peft_toy)
        for name, p in peft_toy.named_parameters():
            p.requires_grad_("lora_" in name)
        expected = {f"{i}.proj.lora_{ab}.weight" for i in range(3) for ab in "AB"}
        assert set(adapter_state(peft_toy)) == expected
        wrapped = shard_network_fsdp1(peft_toy, list(peft_toy), torch.device("cpu"))
        assert set(adapter_state(wrapped)) == expected
        assert any("_fsdp_wrapped_module" in n for n, _ in wrapped.named_parameters())  # the names to clean
        del wrapped
        # a clean teardown. FSDP modules sit in reference cycles that hold the process group (18 more references
        # to it here), so without a collection they live until interpreter finalisation, where gloo's threads can
        # abort the process ("terminate called without an active exception", SIGABRT; one CI run, about 1 in 100
        # runs of this test under load). Collect them while Python is alive, and let both ranks finish first
        # (after this, the group's reference count is back to its value before sharding)
        del model, zero2, toy, reference, params, everyone, peft_toy
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp1_sharding_broadcasts_adapters_averages_gradients_and_gathers_once():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)

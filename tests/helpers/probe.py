"""A callback for multi-process tests: each rank writes the identities it trained on and its final LoRA weights."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save_file


class RankProbe(pl.Callback):
    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.ids: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += [c.id for c in batch.conditions]

    def on_train_end(self, trainer, pl_module):
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        policy = pl_module.policy
        frozen = {
            str(p.dtype)
            for part in (policy.network, *policy.frozen_parts())
            for p in part.parameters()
            if not p.requires_grad
        }
        trained = {str(p.dtype) for p in pl_module.parameters() if p.requires_grad}
        (out / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "ids": self.ids,
                    "world": trainer.world_size,
                    "step": trainer.global_step,
                    "dtypes": {"frozen": sorted(frozen), "trained": sorted(trained)},
                }
            )
        )
        save_file(
            {k: v.contiguous() for k, v in pl_module.policy.lora_state_dict().items()},
            str(out / f"rank{rank}.safetensors"),
        )


class BreakRankOne(pl.Callback):
    """On global rank 1 only: the first loss is NaN and every group of the first rollout gets a NaN reward. The other
    rank sees nothing wrong; the run must neither deadlock nor let the ranks' weights drift apart."""

    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank != 1:
            return
        import divrl.objectives.grpo as module
        from divrl.rewards import NonFiniteReward

        real_loss, calls = module.grpo_loss, {"loss": 0}

        def nan_once(*args, **kwargs):
            calls["loss"] += 1
            loss, stats = real_loss(*args, **kwargs)
            return (loss * float("nan") if calls["loss"] == 1 else loss), stats

        module.grpo_loss = nan_once
        reward = pl_module.rewards[0]
        real_forward = reward.forward

        def nan_first_rollout(*args, **kwargs):
            out = real_forward(*args, **kwargs)
            if pl_module.rollouts_done == 0:
                raise NonFiniteReward("probe: non-finite nssm scores [nan]")
            return out

        reward.forward = nan_first_rollout

    def on_train_end(self, trainer, pl_module):
        out = Path(trainer.default_root_dir) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        state = {**pl_module.counters, "global_step": trainer.global_step}
        (out / f"counters{trainer.global_rank}.json").write_text(json.dumps(state))


class GatherCounter(pl.Callback):
    """Counts FSDP all-gathers (FSDP2's per unit, FSDP1's per flat parameter) during each training rollout; rank 0
    writes ``gathers0.json`` with the counts and the number of FSDP units of the transformer."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.per_rollout: list[int] = []

    def on_fit_start(self, trainer, pl_module):
        import torch.distributed.fsdp._flat_param as fsdp1
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp2

        count = {"n": 0}

        def counted(real):
            def counting(*args, **kwargs):
                count["n"] += 1
                return real(*args, **kwargs)

            return counting

        fsdp2.foreach_all_gather = counted(fsdp2.foreach_all_gather)
        fsdp1.FlatParamHandle._all_gather_flat_param = counted(fsdp1.FlatParamHandle._all_gather_flat_param)
        real_rollout = pl_module._trajectories

        def rollout(*args, **kwargs):
            before = count["n"]
            out = real_rollout(*args, **kwargs)
            if pl_module.training:
                self.per_rollout.append(count["n"] - before)
            return out

        pl_module._trajectories = rollout

    def on_train_end(self, trainer, pl_module):
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        units = sum(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in pl_module.policy.network.modules())
        if trainer.global_rank == 0:
            out = Path(self.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gathers0.json").write_text(json.dumps({"per_rollout": self.per_rollout, "units": units}))


class MisconfiguredRewardOnRankOne(pl.Callback):
    """On global rank 1 only, the reward raises a configuration error (not a non-finite score) at the first rollout."""

    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank != 1:
            return

        def misconfigured(group):
            raise ValueError("probe: this reward is misconfigured")

        for reward in pl_module.rewards:
            reward.forward = misconfigured


class NonFiniteRewardEverywhere(pl.Callback):
    """On every rank, every group's reward is non-finite; writes each rank's counters when the run stops."""

    def on_fit_start(self, trainer, pl_module):
        from divrl.rewards import NonFiniteReward

        def never_finite(group):
            raise NonFiniteReward("probe: non-finite nssm scores [nan]")

        for reward in pl_module.rewards:
            reward.forward = never_finite

    def on_exception(self, trainer, pl_module, exception):
        out = Path(trainer.default_root_dir) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        state = {**pl_module.counters, "global_step": trainer.global_step}
        (out / f"counters{trainer.global_rank}.json").write_text(json.dumps(state))


class MetricsProbe(pl.Callback):
    """Each rank writes the given metrics of every training step (``metrics<rank>.json``, a list of dicts)."""

    def __init__(self, out_dir: str, keys: list[str]):
        super().__init__()
        self.out_dir, self.keys, self.rows = out_dir, keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(trainer.callback_metrics[k]) for k in self.keys if k in trainer.callback_metrics})

    def on_train_end(self, trainer, pl_module):
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"metrics{trainer.global_rank}.json").write_text(json.dumps(self.rows))

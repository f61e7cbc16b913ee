"""The Lightning layer: the DivRL LightningModule, its configuration and its callbacks."""

from divrl.training.callbacks import (
    AdapterEMA,
    LoRAExporter,
    RolloutImageLogger,
    StageSwitch,
    group_grid,
)
from divrl.training.config import GRPOConfig, PolicyConfig
from divrl.training.module import DivRLModule, RolloutGroup, default_optimizer
from divrl.training.strategies import FSDP1Strategy, FSDP2Strategy

__all__ = [
    "DivRLModule",
    "FSDP1Strategy",
    "FSDP2Strategy",
    "GRPOConfig",
    "LoRAExporter",
    "PolicyConfig",
    "RolloutGroup",
    "RolloutImageLogger",
    "StageSwitch",
    "AdapterEMA",
    "default_optimizer",
    "group_grid",
]

"""The Lightning layer: the LightningModule that orchestrates an objective, its configuration, callbacks, sharded
strategies and checkpoint formats."""

from divrl.training.callbacks import (
    AdapterEMA,
    DivRLProgressBar,
    LoRAExporter,
    RolloutImageLogger,
    StageSwitch,
    TrainTimeLimit,
    group_grid,
)
from divrl.training.config import GRPOConfig, KontextConfig, PolicyConfig, SamplingConfig, SystemConfig
from divrl.training.environment import RolloutGroup
from divrl.training.module import DivRLModule, default_optimizer
from divrl.training.strategies import FSDP1Strategy, FSDP2Strategy

__all__ = [
    "DivRLModule",
    "FSDP1Strategy",
    "FSDP2Strategy",
    "GRPOConfig",
    "KontextConfig",
    "LoRAExporter",
    "PolicyConfig",
    "RolloutGroup",
    "RolloutImageLogger",
    "SamplingConfig",
    "StageSwitch",
    "TrainTimeLimit",
    "SystemConfig",
    "AdapterEMA",
    "DivRLProgressBar",
    "default_optimizer",
    "group_grid",
]

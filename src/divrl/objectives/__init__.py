"""Training objectives behind the :class:`Objective` seam (base.py), one file each:

- :class:`GRPOObjective` (grpo.py): Flow-GRPO, DivRL's objective;
- :class:`SFTObjective` (sft.py): flow-matching supervised fine-tuning on target images (IdGlow's stage 1);
- :class:`DPOObjective` and :class:`GroupDPOObjective` (dpo.py): Diffusion-DPO for flow matching, pairwise and
  group-level (DGPO), with reward-gap margins;
- :class:`NFTObjective` (nft.py): DiffusionNFT.

An objective is a dataclass of its settings with ``collect`` (rollout, scores, what the loss needs), ``updates`` (the
work items of each optimizer step) and ``loss``; the flow-matching math they share is in flow.py. The LightningModule
only orchestrates them, and :class:`~divrl.training.StageSwitch` may change the objective between stages.
"""

from divrl.objectives.base import Batch, Environment, Objective, SamplingConfig, Scores
from divrl.objectives.dpo import DPOObjective, GroupDPOObjective, PreferenceBatch
from divrl.objectives.flow import TimestepSampling
from divrl.objectives.grpo import GRPOBatch, GRPOConfig, GRPOObjective
from divrl.objectives.nft import NFTBatch, NFTObjective
from divrl.objectives.sft import SFTBatch, SFTObjective

__all__ = [
    "Objective",
    "Batch",
    "Environment",
    "SamplingConfig",
    "Scores",
    "GRPOObjective",
    "GRPOBatch",
    "GRPOConfig",
    "SFTObjective",
    "SFTBatch",
    "DPOObjective",
    "GroupDPOObjective",
    "PreferenceBatch",
    "NFTObjective",
    "NFTBatch",
    "TimestepSampling",
]

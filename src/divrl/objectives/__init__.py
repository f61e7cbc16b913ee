"""Training objectives: the :class:`Objective` seam (base.py) and Flow-GRPO (:class:`GRPOObjective`, grpo.py).

An objective is one file: a dataclass of its settings with ``collect`` (rollout, scores, what the loss needs),
``updates`` (the work items of each optimizer step) and ``loss``. The LightningModule only orchestrates them.
"""

from divrl.objectives.base import Batch, Environment, Objective, SamplingConfig, Scores
from divrl.objectives.grpo import GRPOBatch, GRPOConfig, GRPOObjective

__all__ = ["Objective", "Batch", "Environment", "SamplingConfig", "Scores", "GRPOObjective", "GRPOBatch", "GRPOConfig"]

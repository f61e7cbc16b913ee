"""Flow-GRPO in plain torch: the SDE step with its log-probability, rollouts, advantages, loss.

The sampler reaches the model only through the :class:`~divrl.policy.Policy` seam; a family's sigma schedule is its
own (FLUX's: :mod:`divrl.policy.kontext.schedule`).

- :mod:`divrl.grpo.sde`: ``sde_step`` (sample a step, or score a recorded one) → ``SDEStepOutput``.
- :mod:`divrl.grpo.advantages`: ``group_advantages`` (per group or per batch, clipped); ``pooled_advantages``
  (statistics over a larger pool, e.g. every rank's rewards).
- :mod:`divrl.grpo.loss`: ``grpo_loss`` (PPO-clipped) and ``kl_divergence`` (to the reference policy).
- :mod:`divrl.grpo.timesteps`: which steps are stochastic and which are trained (fraction or window mode).
- :mod:`divrl.grpo.sampler`: group rollouts with log-prob bookkeeping (``rollout`` → ``Trajectory``) and the
  training-path log-prob of a recorded step (``transition_log_prob``).
"""

from divrl.grpo.advantages import group_advantages, pooled_advantages
from divrl.grpo.loss import grpo_loss, kl_divergence
from divrl.grpo.sampler import Trajectory, rollout, transition_log_prob
from divrl.grpo.sde import SDEStepOutput, sde_step
from divrl.grpo.timesteps import random_window, sde_mask, select_train_steps

__all__ = [
    # sde
    "SDEStepOutput",
    "sde_step",
    # advantages
    "group_advantages",
    "pooled_advantages",
    # loss
    "grpo_loss",
    "kl_divergence",
    # rollout
    "Trajectory",
    "rollout",
    "transition_log_prob",
    # timesteps
    "select_train_steps",
    "sde_mask",
    "random_window",
]

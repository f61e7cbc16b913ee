"""A reward from its YAML block: the ``class_path`` / ``init_args`` entry of ``model.rewards``, in a file of its own or
picked from a training config (``divrl serve-reward --config``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_reward", "reward_block"]


def reward_block(config: Path | str | dict, stage: int | None = None) -> dict:
    """The reward block of ``config``: a YAML file (or its parsed mapping) holding one ``class_path`` / ``init_args``
    block, or a training config whose ``model.rewards[stage - 1]`` is taken (``stage`` 1-based; required when the
    config has several). ``ValueError`` naming the file and the fix for anything else."""
    import yaml

    where = "the reward config" if isinstance(config, dict) else str(config)
    if isinstance(config, dict):
        block = config
    else:
        try:
            block = yaml.safe_load(Path(config).read_text())
        except OSError as err:
            raise ValueError(f"--config {config}: cannot read it ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            raise ValueError(f"--config {config}: not YAML ({str(err).splitlines()[0]})") from None
    if isinstance(block, dict) and "model" in block:
        model = block.get("model")
        rewards = model.get("rewards") if isinstance(model, dict) else None
        if not isinstance(rewards, list) or not rewards:
            raise ValueError(
                f"--config {where}: a training config with no model.rewards list; give a reward block "
                f"(class_path, init_args) or a config with model.rewards"
            )
        if stage is None and len(rewards) > 1:
            raise ValueError(
                f"--config {where} has {len(rewards)} stage rewards; pick one with --stage 1..{len(rewards)}"
            )
        stage = stage or 1
        if not 1 <= stage <= len(rewards):
            raise ValueError(f"--stage {stage}: {where} has stages 1..{len(rewards)}")
        block = rewards[stage - 1]
    elif stage is not None:
        raise ValueError(f"--stage {stage}: {where} is one reward block, not a training config with model.rewards")
    if not isinstance(block, dict) or "class_path" not in block:
        raise ValueError(
            f"--config {where}: expected a reward block such as `class_path: divrl.rewards.NSSMReward` "
            f"with its init_args (an entry of model.rewards), got {str(block)[:200]}"
        )
    return block


def build_reward(config: Path | str | dict, stage: int | None = None):
    """The :class:`~divrl.rewards.Reward` of :func:`reward_block`'s block, built by jsonargparse as ``divrl fit``
    builds ``model.rewards``; ``ValueError`` naming the file when the block is not a reward."""
    from jsonargparse import ArgumentParser

    from divrl.rewards.base import Reward

    block = reward_block(config, stage)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    try:
        parsed = parser.parse_object({"reward": block})
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
        return instantiate(parsed).reward
    except Exception as err:  # noqa: BLE001 - jsonargparse's refusal (or the reward's own), as one sentence
        where = "the reward config" if isinstance(config, dict) else str(config)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--config {where}: not a divrl reward ({first})") from None

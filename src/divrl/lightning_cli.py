"""The Lightning application behind ``divrl fit | validate | sample | evaluate``: a ``LightningCLI`` over
:class:`~divrl.training.DivRLModule` and :class:`~divrl.data.IdentityDataModule` with
:class:`~divrl.training.DivRLTrainer`'s ``sample`` and ``evaluate``. Its own module so that the commands built on it
(``divrl export``, ``divrl app``) use it without importing the console script (:mod:`divrl.cli`)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["run_lightning"]


def _lightning_cli():
    from lightning.pytorch.cli import LightningCLI

    from divrl.data.datamodule import IdentityDataModule
    from divrl.training.module import DivRLModule
    from divrl.training.trainer import DivRLTrainer

    class DivRLCLI(LightningCLI):
        """``LightningCLI`` over DivRLModule / IdentityDataModule with DivRLTrainer's ``sample`` and ``evaluate``."""

        def _parse_ckpt_path(self) -> None:
            """Lightning's reloads the model settings saved in a ``--ckpt_path`` file over the command line, silently
            (and does not for ``last``). Here the command line's settings apply in both cases: the module compares
            them with the checkpoint's when it loads it, refusing those its weights cannot take and listing the
            others (:func:`divrl.training.checkpoints.compare_settings`)."""

        def _set_seed(self) -> None:
            seed = self._get(self.config, "seed_everything")
            if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed <= 2**32 - 1:  # numpy's range
                raise ValueError(f"seed_everything {seed} must lie in [0, {2**32 - 1}] (numpy's seed range)")
            super()._set_seed()

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {
                "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"},
                "sample": {"model", "datamodule"},
                "evaluate": {"model", "datamodule"},
            }

    return DivRLCLI, DivRLModule, IdentityDataModule, DivRLTrainer


def run_lightning(argv: Sequence[str] | None = None, run: bool = True):
    """Run (or, with ``run=False``, only parse and instantiate) a ``fit`` / ``validate`` / ``sample`` / ``evaluate``
    command line."""
    import warnings

    from divrl.notices import quiet_loading_bars

    quiet_loading_bars()
    DivRLCLI, module, datamodule, trainer = _lightning_cli()
    # Expected in RL post-training: the frozen base and the reward backbones stay in eval mode on purpose, and the
    # condition stream handles DataLoader workers itself.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # With manual optimization a checkpoint taken after the update is what we want (LoRA and optimizer after step N).
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # FSDP2 warns that FLUX blocks return views (in-place ops on them would skip its backward hook); diffusers' blocks
    # only use them out of place: tests/test_distributed.py checks FSDP2's adapter against DDP's after training.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # Lightning rewrites checkpoints/last.ckpt on purpose; under FSDP2 it is a folder and torch warns each time.
    warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint in .*overwriting")
    if argv is not None:  # called from Python (tests, notebooks) with explicit arguments
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    return DivRLCLI(
        module,
        datamodule,
        trainer_class=trainer,
        args=list(argv) if argv is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "divrl", "exit_on_error": False},
    )

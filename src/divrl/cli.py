"""The ``divrl`` console script.

- ``divrl fit | validate | sample | evaluate --config CONFIG.yaml ...``: the Lightning application (:class:`DivRLCLI`, a
  ``LightningCLI`` over :class:`~divrl.training.DivRLModule` and :class:`~divrl.data.IdentityDataModule`);
  ``--print_config`` shows the full resolved configuration.
- ``divrl score``: score generated images against a reference with the DivRL rewards (with no images it scores a
  built-in example group).
- ``divrl data``: convert datasets into identity shards (:mod:`divrl.cli_data`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from divrl import __version__
from divrl.cli_data import add_data_command, file_name
from divrl.images import MIN_SIDE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="divrl", description="RL post-training of subject-driven image generators.")

    def bounded(kind: type, low: float, strict: bool = False, high: float | None = None):
        """An argparse type refusing NaN, infinities, values below ``low`` (at or below with ``strict``) and above
        ``high``: ``must be >= 1, got 0``, ``must be in [0, 1], got 2``, ``must be a finite number >= 0, got nan``."""
        def parse(text: str):
            value, finite = kind(text), "" if abs(kind(text)) < float("inf") else "a finite number "
            if finite or value < low or (strict and value == low) or (high is not None and value > high):
                span = f"in [{low}, {high}]" if high is not None else f"{'>' if strict else '>='} {low}"
                raise argparse.ArgumentTypeError(f"must be {finite}{span}, got {text}")
            return value

        parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
        return parse

    parser.add_argument("--version", action="version", version=f"divrl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    score = commands.add_parser(
        "score",
        help="score images against a reference with nSSM, VSM and the DivRL rewards",
        description=(
            "Score generated images against one reference: nSSM (structural diversity), VSM (identity), R2 = the "
            "gated stage-2 reward and the linear baseline. With no --reference, scores a built-in example group."
        ),
    )
    score.add_argument("--reference", type=Path, help="reference image (the subject photo)")
    score.add_argument("--ref-mask", type=Path, help="optional subject mask of the reference (white = subject)")
    score.add_argument("images", nargs="*", type=Path, help="generated images to score (one group)")
    score.add_argument(
        "--backbone", choices=["dense", "dinov2"], default="dense",
        help="feature backbone: the weight-free dense descriptor (offline) or DINOv2 (default: dense)",
    )
    score.add_argument("--model", default="facebook/dinov2-small", help="DINOv2 Hub id or local folder")
    score.add_argument("--mtg-url", help="score with a running Mind-the-Glitch reward server instead of a backbone")
    score.add_argument("--timeout", type=bounded(float, 0, strict=True), default=120.0,
                       help="--mtg-url: seconds per request (default 120)")
    score.add_argument("--retries", type=bounded(int, 0), default=3,
                       help="--mtg-url: extra attempts on transient failures (default 3)")
    score.add_argument("--pool", type=bounded(int, 1), default=2,
                       help="nSSM pooling factor on the 48x48 grid (default 2 -> 24x24)")
    score.add_argument("--tau-s", type=bounded(float, 0, high=1), default=0.7, help="VSM semantic threshold (0.7)")
    score.add_argument("--tau-v", type=bounded(float, 0, high=1), default=0.7, help="VSM visual threshold (0.7)")
    score.add_argument("--threshold", type=bounded(float, 0, high=1), default=0.5, help="R2 identity gate s (0.5)")
    score.add_argument("--weight", type=bounded(float, 0), default=5.0, help="R2 penalty weight lambda (default 5)")
    score.add_argument("--size", type=bounded(int, MIN_SIDE), default=512,
                       help=f"resize images to this square size first (default 512; >= {MIN_SIDE}: DINOv2's 14-px patch)")
    score.add_argument("--json", type=file_name, help="also write the scores to this JSON file (its folder is created)")
    score.set_defaults(func=run_score)

    add_data_command(commands)
    return parser


def run_score(args: argparse.Namespace) -> int:
    from divrl.images import check_side, to_image_batch, to_mask_batch
    from divrl.rewards import FeatureScorer, GatedReward
    from divrl.rewards import functional as RF

    if args.json is not None:  # before minutes of scoring
        inputs = [p for p in (args.reference, args.ref_mask, *args.images) if p is not None and p.exists()]
        if args.json.exists() and any(args.json.samefile(p) for p in inputs):
            raise ValueError(f"--json {args.json} is one of the inputs; the scores would overwrite it: give another "
                             f"file name, e.g. --json scores.json")
        try:  # an existing file is replaced only when it is a scores file divrl score wrote
            ours = not args.json.is_file() or "scores" in dict(json.loads(args.json.read_bytes()))
        except (ValueError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"--json {args.json} exists and is not a scores file of divrl score (JSON with "
                             f"\"scores\"); give another file name, or remove it to write there")
        if args.json.is_dir():
            raise IsADirectoryError(f"--json {args.json} is a folder; give a file name, e.g. --json "
                                    f"{args.json / 'scores.json'}")
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot write --json {args.json} ({err.strerror or err}); give a file in a folder you can "
                          f"write to") from err
    if args.reference is None:
        if args.images:
            raise SystemExit("divrl score: images were given without --reference REFERENCE")
        from divrl.examples import example_group

        reference, ref_mask, images, names = example_group()
        print("No --reference given: scoring the built-in example group (a procedural subject and 5 variants).")
    else:
        if not args.images:
            raise SystemExit("divrl score: give the generated images to score after --reference REFERENCE")
        resize = _square(args.size)
        reference = check_side(to_image_batch(args.reference, "--reference"), f"--reference {args.reference}")
        images = torch.cat([resize(check_side(to_image_batch(p, str(p)), f"image {p}")) for p in args.images])
        ref_mask = to_mask_batch(args.ref_mask, "--ref-mask") if args.ref_mask else None
        if ref_mask is not None:  # checked as `divrl sample --mask` is, before anything is scored
            (h, w), (mh, mw) = reference.shape[-2:], ref_mask.shape[-2:]
            if (h, w) != (mh, mw) or not (ref_mask > 0.5).any():
                raise ValueError(f"--ref-mask {args.ref_mask} " + (f"is {mw}x{mh} but --reference {args.reference} is "
                                 f"{w}x{h}; resize the mask to its reference" if (h, w) != (mh, mw) else "has no subject "
                                 "pixel (all black; white marks the subject); fix it") + ", or score without --ref-mask")
            ref_mask = torch.nn.functional.interpolate(ref_mask[:, None], size=(args.size,) * 2, mode="area")[:, 0]
        reference, names = resize(reference)[0], [p.name for p in args.images]
    if args.mtg_url:  # the scorer is built once the inputs are known to be usable (DINOv2 takes a while to load)
        from divrl.rewards.backbones import MTGServerScorer

        scorer = MTGServerScorer(args.mtg_url, tau_s=args.tau_s, timeout=args.timeout, retries=args.retries)
    elif args.backbone == "dinov2":
        from divrl.rewards.backbones import DINOv2Backbone

        scorer = FeatureScorer(DINOv2Backbone(args.model), pool=args.pool, tau_s=args.tau_s, tau_v=args.tau_v)
    else:
        from divrl.rewards.backbones import DenseDescriptor

        scorer = FeatureScorer(DenseDescriptor(), pool=args.pool, tau_s=args.tau_s, tau_v=args.tau_v)

    reward = GatedReward(scorer, threshold=args.threshold, weight=args.weight)
    out = reward(reference, images, ref_mask=ref_mask)
    nssm, vsm = out.components["nssm"], out.components["vsm"]
    linear = RF.linear_reward(nssm, vsm, 0.5)
    width = max(len(n) for n in names)
    print(f"{'image':<{width}}  {'nSSM':>6}  {'VSM':>6}  {'R2':>7}  {'linear':>6}")
    for k, name in enumerate(names):
        flag = "  (identity gate)" if out.gated[k] else ""
        print(f"{name:<{width}}  {nssm[k]:6.3f}  {vsm[k]:6.3f}  {out.reward[k]:7.3f}  {linear[k]:6.3f}{flag}")
    if args.json:
        rows = [
            {"image": n, "nssm": float(nssm[k]), "vsm": float(vsm[k]), "r2": float(out.reward[k]),
             "linear": float(linear[k]), "penalized": bool(out.gated[k])}
            for k, n in enumerate(names)
        ]
        args.json.write_text(json.dumps({"scores": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


def _square(size: int):
    def resize(batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)

    return resize


LIGHTNING_COMMANDS = ("fit", "validate", "sample", "evaluate")
"""Subcommands served by :class:`DivRLCLI`; the others (``score``) are plain argparse commands."""


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
        module, datamodule, trainer_class=trainer, args=list(argv) if argv is not None else None, run=run,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "divrl"},
    )


def expected_error(err: BaseException) -> str | None:
    """The sentence of an error divrl raised on purpose about its input (a ``ValueError``, ``OSError`` or
    ``RuntimeError`` raised in divrl's own code, or one of them inside jsonargparse's "Does not validate against any of
    the Union subtypes"), or ``None`` for anything else: a bug, whose traceback the user needs."""
    import traceback

    text = str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text:  # no bug: the run is too big
        return (f"out of memory ({text.splitlines()[0][:200]}); make the run smaller: data.batch_size, "
                f"sampling.group_size or sampling.resolution, or set system.rollout_micro_batch_size, "
                f"objective.micro_batch_size, policy.gradient_checkpointing")
    if isinstance(err, ValueError) and "Does not validate against any of the Union subtypes" in text:
        reasons = [line[4:] for line in text.splitlines() if line.startswith("  - ")  # the subtypes' own reasons,
                   and not line[4:].startswith(("Expected a <class", "Not a valid subclass"))]  # not the menu
        return "; ".join(reasons) or None
    frames = traceback.extract_tb(err.__traceback__)
    package = Path(__file__).resolve().parent
    # raised on purpose: the innermost frame is a ``raise`` statement in divrl (a tensor-shape RuntimeError or an
    # unpacking ValueError raised by torch or Python on a divrl line is a bug, and keeps its traceback)
    ours = bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(package) and _raises(frames[-1])
    if isinstance(err, KeyError) and ours:
        return str(err.args[0]) if err.args else None
    return text if ours and isinstance(err, (ValueError, OSError, RuntimeError, FloatingPointError)) and text else None


def _raises(frame) -> bool:
    """Whether the statement at ``frame`` raises (its first line, or the line the frame points to, says ``raise``)."""
    import linecache

    line = (frame.line or "").strip()
    if line.startswith("raise"):
        return True
    # a multi-line raise: the frame may point inside it; look back to the statement's first line
    for number in range(frame.lineno, max(frame.lineno - 8, 0), -1):
        text = linecache.getline(frame.filename, number).strip()
        if text.startswith("raise"):
            return True
        if text.endswith(":") or not text:
            return False
    return False


def check_command_line(args: Sequence[str]) -> list[str]:
    """What jsonargparse would refuse with its usage screen, refused with one sentence before it parses: a ``--config``
    file that is missing, not UTF-8 or not YAML (named, with the line), and settings of the former ``model.grpo``
    group (on the command line or in a config), each named with where it moved. Inline (``--config '{...}'``) and
    remote (``s3://...``) configs are left to jsonargparse. Returns the configs given."""
    from divrl.eval.runner import method_name
    from divrl.training.checkpoints import moved_setting

    flags = ("--config", "-c")
    configs = [value for flag, value in zip(args, [*args[1:], None]) if flag in flags and value]
    configs += [arg.split("=", 1)[1] for arg in args if arg.startswith(("--config=", "-c="))]
    old = [arg.split("=", 1)[0].removeprefix("--model.grpo.") for arg in args if arg.startswith("--model.grpo.")]
    methods = [v for f, v in zip(args, [*args[1:], None]) if f == "--methods" and v] + [
        a.split("=", 1)[1] for a in args if a.startswith("--methods=")]
    for value in methods:  # jsonargparse would answer with its usage screen and a Union error
        given = _yaml(value, f"--methods {value!r}")
        if given is None:  # null clears a config's methods (score --samples_dir alone)
            continue
        if not isinstance(given, dict):
            raise ValueError(f"--methods takes a mapping of method name to weights (a LoRA, a run's .ckpt, or null for "
                             f"the base model), e.g. '{{base: null, mine: runs/demo/lora/final}}'; got {value!r}")
        for name in given:  # a key YAML reads as a date or a number is a string to jsonargparse
            method_name(str(name), "--methods")
    where = "on the command line"
    for value in configs:
        config, path = _config(value)
        grpo = config.get("model", {}).get("grpo") if isinstance(config, dict) and isinstance(
            config.get("model"), dict) else None
        if isinstance(grpo, dict) and not old:
            old, where = list(grpo), f"in --config {path or value}"
    if old:
        moves = ", ".join(f"model.grpo.{key} -> model.{moved_setting(key)}" for key in old)
        raise ValueError(f"the settings of model.grpo {where} moved when they were grouped by concern ({moves}); "
                         f"rename them (the README's Training section lists every move)")
    return configs


def _config(value: str):
    """A ``--config`` value read as YAML: ``(content, path)``; a remote one is not read (``(None, None)``), an inline
    mapping has no path."""
    path = Path(value)
    if "://" in value:
        return None, None
    if path.is_dir():
        raise IsADirectoryError(f"--config {value} is a folder; pass a YAML file (e.g. configs/demo.yaml)")
    if not path.is_file():
        inline = _yaml(value, f"--config {value!r}") if "\n" in value or value.lstrip().startswith("{") else None
        if isinstance(inline, dict):
            return inline, None
        raise FileNotFoundError(f"--config {value} does not exist (relative paths start at {os.getcwd()!r})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset {err.start}); "
                         f"save it as UTF-8") from None
    config = _yaml(text, f"--config {path}")
    if not isinstance(config, dict):
        raise ValueError(f"--config {path} {'is empty' if config is None else f'holds a {type(config).__name__}'}, not a "
                         f"mapping of settings (trainer:, model:, data:); fix the file or drop it")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    sections = {**{k: v for k, v in config.items() if k in ("trainer", "model", "data")},
                **{f"model.{k}": v for k, v in model.items() if k in ("policy", "sampling", "system")}}
    bad = next(((k, v) for k, v in sections.items() if isinstance(v, (list, int, float))), None)
    if bad is not None:
        raise ValueError(f"{bad[0]} in --config {path} is a {type(bad[1]).__name__}; it takes a mapping of settings "
                         f"({bad[0]}: {{name: value, ...}})")
    return config, path


def _yaml(text: str, what: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{what} is not valid YAML: {getattr(err, 'problem', None) or err}{at}; fix it") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``divrl`` command. Called without ``argv`` (the console script), an error divrl raised about its input
    prints its sentence alone and exits 1 (``DIVRL_TRACEBACK=1`` shows the traceback too); from Python (``argv``
    given) errors propagate."""
    from divrl.notices import quiet

    quiet()  # before the libraries load: their import-time notices that do not apply (divrl.notices says why)
    if argv is not None or os.environ.get("DIVRL_TRACEBACK", "0") not in ("", "0"):
        return _main(argv)
    try:
        return _main(argv)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is one of divrl's own sentences
        message = expected_error(err)
        if message is None:
            raise
        command = f"divrl {sys.argv[1]}" if len(sys.argv) > 1 else "divrl"
        sentence = message if message.startswith(command) else f"{command}: {message}"  # no "divrl sample: divrl sample"
        print(f"{sentence}\n(DIVRL_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None = None) -> int:
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from divrl.training.trainer import asks_for_gpus

        configs = check_command_line(argv[1:])
        try:
            run_lightning(given)
        except MisconfigurationException as err:
            if not asks_for_gpus(err) or torch.cuda.is_available():
                raise
            named = f" (--config {' + '.join(configs)})" if configs else ""
            print(f"divrl {argv[0]}: this run{named} asks for GPUs and this machine has no CUDA GPU ({err}). On a CPU try the demo, `divrl fit --config configs/demo.yaml`, or "
                  f"set --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto", file=sys.stderr)
            return 2
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        print(f"\nTraining commands (see `divrl fit --help`): {', '.join(LIGHTNING_COMMANDS)}")
        return 0 if argv else 2
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``divrl`` console script.

- ``divrl fit | validate | sample | evaluate --config CONFIG.yaml ...``: the Lightning application (:class:`DivRLCLI`, a
  ``LightningCLI`` over :class:`~divrl.training.DivRLModule` and :class:`~divrl.data.IdentityDataModule`);
  ``--print_config`` shows the full resolved configuration.
- ``divrl score``: score generated images against a reference with the DivRL rewards (with no images it scores a
  built-in example group).
- ``divrl data``: convert datasets into identity shards (:mod:`divrl.cli_data`).
- ``divrl serve-reward``: serve a reward on LitServe for :class:`~divrl.rewards.RemoteReward` (:mod:`divrl.cli_serve`).
- ``divrl export``: a Hub-ready folder with a model card, optionally uploaded (:mod:`divrl.cli_export`).
- ``divrl app``: a Gradio app comparing base and trained samples (:mod:`divrl.app`, the ``app`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from divrl import __version__
from divrl.cli_app import add_app_command
from divrl.cli_checks import check_command_line, condensed_parser_error, expected_error  # noqa: F401
from divrl.cli_data import add_data_command, file_name
from divrl.cli_export import add_export_command
from divrl.cli_serve import add_serve_command
from divrl.images import MIN_SIDE
from divrl.lightning_cli import run_lightning


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
        "--backbone",
        choices=["dense", "dinov2"],
        default="dense",
        help="feature backbone: the weight-free dense descriptor (offline) or DINOv2 (default: dense)",
    )
    score.add_argument("--model", default="facebook/dinov2-small", help="DINOv2 Hub id or local folder")
    score.add_argument(
        "--mtg-url",
        action="append",
        metavar="URL",
        help="score with a running Mind-the-Glitch reward server instead of a backbone (repeat it for "
        "several servers: requests fail over between them)",
    )
    score.add_argument(
        "--timeout",
        type=bounded(float, 0, strict=True),
        default=120.0,
        help="--mtg-url: seconds per request (default 120)",
    )
    score.add_argument(
        "--retries", type=bounded(int, 0), default=3, help="--mtg-url: extra attempts on transient failures (default 3)"
    )
    score.add_argument(
        "--pool", type=bounded(int, 1), default=2, help="nSSM pooling factor on the 48x48 grid (default 2 -> 24x24)"
    )
    score.add_argument("--tau-s", type=bounded(float, 0, high=1), default=0.7, help="VSM semantic threshold (0.7)")
    score.add_argument("--tau-v", type=bounded(float, 0, high=1), default=0.7, help="VSM visual threshold (0.7)")
    score.add_argument("--threshold", type=bounded(float, 0, high=1), default=0.5, help="R2 identity gate s (0.5)")
    score.add_argument("--weight", type=bounded(float, 0), default=5.0, help="R2 penalty weight lambda (default 5)")
    score.add_argument(
        "--size",
        type=bounded(int, MIN_SIDE),
        default=512,
        help=f"resize images to this square size first (default 512; >= {MIN_SIDE}: DINOv2's 14-px patch)",
    )
    score.add_argument("--json", type=file_name, help="also write the scores to this JSON file (its folder is created)")
    score.set_defaults(func=run_score)

    add_data_command(commands)
    add_serve_command(commands, bounded)
    add_export_command(commands, bounded)
    add_app_command(commands, bounded)
    return parser


def run_score(args: argparse.Namespace) -> int:
    from divrl.images import check_side, to_image_batch, to_mask_batch
    from divrl.rewards import FeatureScorer, GatedReward
    from divrl.rewards import functional as RF

    if args.json is not None:  # before minutes of scoring
        inputs = [p for p in (args.reference, args.ref_mask, *args.images) if p is not None and p.exists()]
        if args.json.exists() and any(args.json.samefile(p) for p in inputs):
            raise ValueError(
                f"--json {args.json} is one of the inputs; the scores would overwrite it: give another "
                f"file name, e.g. --json scores.json"
            )
        try:  # an existing file is replaced only when it is a scores file divrl score wrote
            ours = not args.json.is_file() or "scores" in dict(json.loads(args.json.read_bytes()))
        except (ValueError, TypeError):
            ours = False
        if not ours:
            raise ValueError(
                f"--json {args.json} exists and is not a scores file of divrl score (JSON with "
                f'"scores"); give another file name, or remove it to write there'
            )
        if args.json.is_dir():
            raise IsADirectoryError(
                f"--json {args.json} is a folder; give a file name, e.g. --json {args.json / 'scores.json'}"
            )
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(args.json.parent, os.W_OK) or (args.json.exists() and not os.access(args.json, os.W_OK)):
                raise PermissionError(30, "not writable (a read-only folder or file system)")
        except OSError as err:
            raise OSError(
                f"cannot write --json {args.json} ({err.strerror or err}); give a file in a folder you can write to"
            ) from err
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
                raise ValueError(
                    f"--ref-mask {args.ref_mask} "
                    + (
                        f"is {mw}x{mh} but --reference {args.reference} is {w}x{h}; resize the mask to its reference"
                        if (h, w) != (mh, mw)
                        else "has no subject pixel (all black; white marks the subject); fix it"
                    )
                    + ", or score without --ref-mask"
                )
            ref_mask = torch.nn.functional.interpolate(ref_mask[:, None], size=(args.size,) * 2, mode="area")[:, 0]
        reference, names = resize(reference)[0], [p.name for p in args.images]
    if args.mtg_url:  # the scorer is built once the inputs are known to be usable (DINOv2 takes a while to load)
        from divrl.rewards.backbones import MTGServerScorer

        scorer = MTGServerScorer(urls=args.mtg_url, tau_s=args.tau_s, timeout=args.timeout, retries=args.retries)
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
            {
                "image": n,
                "nssm": float(nssm[k]),
                "vsm": float(vsm[k]),
                "r2": float(out.reward[k]),
                "linear": float(linear[k]),
                "penalized": bool(out.gated[k]),
            }
            for k, n in enumerate(names)
        ]
        try:
            args.json.write_text(json.dumps({"scores": rows}, indent=2))
        except OSError as err:
            raise OSError(
                f"cannot write --json {args.json} ({err.strerror or err}); the scores are printed above"
            ) from err
        print(f"wrote {args.json}")
    return 0


def _square(size: int):
    def resize(batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)

    return resize


LIGHTNING_COMMANDS = ("fit", "validate", "sample", "evaluate")
"""Subcommands served by :class:`DivRLCLI`; the others (``score``) are plain argparse commands."""


def main(argv: Sequence[str] | None = None) -> int:
    """The ``divrl`` command. Called without ``argv`` (the console script), an error divrl raised about its input
    prints its sentence alone and exits 1 (``DIVRL_TRACEBACK=1`` shows the traceback too); from Python (``argv``
    given) errors propagate."""
    from divrl.notices import quiet

    quiet()  # before the libraries load: their import-time notices that do not apply (divrl.notices says why)
    if argv is not None or os.environ.get("DIVRL_TRACEBACK", "0").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
        "off",
    ):
        return _main(argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before training started (a fit under way prints its own summary): nothing was written
        command = f"divrl {sys.argv[1]}" if len(sys.argv) > 1 else "divrl"
        print(f"\n{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - re-raised unless it is one of divrl's own sentences
        message = expected_error(err)
        if message is None:
            raise
        command = f"divrl {sys.argv[1]}" if len(sys.argv) > 1 else "divrl"
        sentence = (
            message if message.startswith(command) else f"{command}: {message}"
        )  # no "divrl sample: divrl sample"
        print(f"{sentence}\n(DIVRL_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None = None) -> int:
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from jsonargparse import ArgumentError
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from divrl.training.trainer import asks_for_gpus

        configs = check_command_line(argv[1:])
        try:
            run_lightning(given)
        except ArgumentError as err:  # jsonargparse's refusal, without its usage screen
            print(f"divrl {argv[0]}: {condensed_parser_error(str(err), f'divrl {argv[0]}')}", file=sys.stderr)
            raise SystemExit(2) from None
        except MisconfigurationException as err:
            if not asks_for_gpus(err) or torch.cuda.is_available():
                raise
            named = f" (--config {' + '.join(configs)})" if configs else ""
            print(
                f"divrl {argv[0]}: this run{named} asks for GPUs and this machine has no CUDA GPU ({err}). On a CPU try the demo, `divrl fit --config configs/demo.yaml`, or "
                f"set --trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto",
                file=sys.stderr,
            )
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

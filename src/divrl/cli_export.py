"""``divrl export RUN_OR_LORA --out DIR``: a Hub-ready folder with a model card (:mod:`divrl.export`), optionally
uploaded with ``--push-to-hub OWNER/NAME``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from divrl.export import ExportError, find_run, push_to_hub, read_samples, sampling_config, write_export


def add_export_command(commands, bounded) -> None:
    export = commands.add_parser(
        "export",
        help="write a Hub-ready folder (LoRA, model card, config, samples) and optionally upload it",
        description=(
            "Write a trained run's LoRA(s) with a model card (front matter for the Hub, the training recipe, samples, "
            "the evaluation and a diffusers snippet that reproduces the first sample) and its config into --out. "
            "Samples come from --samples (a `divrl sample` folder) or are generated with the run's config."
        ),
    )
    export.add_argument("run", type=Path, help="a run folder (runs/demo) or a LoRA folder (runs/demo/lora/final)")
    export.add_argument("--out", type=Path, required=True, help="the folder to write (created; must be empty)")
    export.add_argument("--config", type=Path, help="the run's config.yaml (default: found beside the weights)")
    export.add_argument("--samples", type=Path, help="a `divrl sample --output_dir` folder to show (default: sample)")
    export.add_argument(
        "--num-identities", type=bounded(int, 1), default=2, help="identities to sample when no --samples (default 2)"
    )
    export.add_argument(
        "--num-samples",
        type=bounded(int, 0),
        default=4,
        help="samples per identity when no --samples (default 4; 0: no samples, no reproduced image)",
    )
    export.add_argument("--num-steps", type=bounded(int, 1), default=28, help="sampling steps (default 28)")
    export.add_argument("--seed", type=bounded(int, 0), default=0, help="sampling seed (default 0)")
    export.add_argument("--eval", type=Path, help="a `divrl evaluate --output_dir` folder: its table and frontier plot")
    export.add_argument("--base-model", help="the base model's Hub id (default: the run's model.policy.model)")
    export.add_argument("--license", help="the card's license (default: the base model's)")
    export.add_argument("--push-to-hub", metavar="OWNER/NAME", help="upload the folder to this Hub repository")
    export.add_argument("--private", action="store_true", help="--push-to-hub: create the repository private")
    export.set_defaults(func=run_export)


def generate_samples(run, out: Path, args: argparse.Namespace) -> Path:
    """Sample the exported weights with the run's configuration (``divrl sample``, in this process) into ``out``."""
    from divrl.lightning_cli import run_lightning

    if run.config_path is None:
        raise ExportError(
            f"{args.run}: no config.yaml found beside the weights to sample them with; pass --config (the run's "
            f"config.yaml), --samples (a `divrl sample` folder) or --num-samples 0"
        )
    config = sampling_config(run.config, one_device=True, where=str(run.config_path))
    out.mkdir(parents=True, exist_ok=True)
    sample_config = out / "sample_config.yaml"
    sample_config.write_text(yaml.safe_dump(config, sort_keys=False))
    run_lightning(
        [
            "sample",
            "--config",
            str(sample_config),
            "--lora",
            str(run.lora),
            "--output_dir",
            str(out / "samples"),
            "--num_identities",
            str(args.num_identities),
            "--num_samples",
            str(args.num_samples),
            "--num_steps",
            str(args.num_steps),
            "--seed",
            str(args.seed),
        ]
    )
    return out / "samples"


def run_export(args: argparse.Namespace) -> int:
    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; pass a new folder so nothing is overwritten")
    if args.push_to_hub is not None and args.push_to_hub.count("/") != 1:
        raise ExportError(f"--push-to-hub {args.push_to_hub}: give the repository as OWNER/NAME")
    for flag, folder in (("--samples", args.samples), ("--eval", args.eval)):
        if folder is not None and not folder.is_dir():
            raise ExportError(f"{flag} {folder} is not a folder")
    run = find_run(args.run, args.config)
    with tempfile.TemporaryDirectory(prefix="divrl-export-") as scratch:
        samples = None
        if args.samples is not None:
            samples = read_samples(args.samples)
        elif args.num_samples > 0:
            samples = read_samples(generate_samples(run, Path(scratch), args))
        write_export(run, out, samples, args.eval, args.base_model, args.license, args.push_to_hub)
    print(f"[divrl] wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.push_to_hub is not None:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private, endpoint=os.environ.get("HF_ENDPOINT"))
        except ExportError as err:
            print(f"divrl export: {err}", file=sys.stderr)
            return 1
        print(f"[divrl] uploaded to {url}")
    return 0

"""``divrl data``: convert a published dataset layout (or the synthetic world) into identity shards."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch


def add_data_command(commands) -> None:
    """Register ``divrl data`` on the console script's subcommands."""
    data = commands.add_parser(
        "data",
        help="convert a published dataset layout into divrl identity shards",
        description=(
            "Convert SynCD (release folders or DivRL's parquet copy), DreamBench++, DreamBooth, PSRBench or the "
            "synthetic demo world into WebDataset identity shards (schema: data/README.md). Bad items are skipped, "
            "named and counted; --strict makes any skip an error. Shards are renamed into place only when complete."
        ),
    )
    data.add_argument("source", choices=["syncd", "dreambench", "dreambooth", "psrbench", "synthetic"])
    data.add_argument("--src", type=Path, help="the dataset folder (or a SynCD .parquet file); not for synthetic")
    data.add_argument("--out", type=Path, required=True, help="output folder for train-*.tar and val-*.tar")
    data.add_argument("--resolution", type=int, default=512, help="reference side in pixels (default 512; 0 keeps)")
    data.add_argument("--resize", choices=["pad", "crop", "stretch", "none"], default="pad",
                      help="keep aspect and pad (default), centre crop, stretch (DivRL's training), or none")
    data.add_argument("--shard-size", type=int, default=100, help="identities per shard (default 100)")
    data.add_argument("--val-fraction", type=float, default=None,
                      help="share of identities in the validation split, chosen by a hash of the id (default 0; "
                           "psrbench, an evaluation benchmark: 1, all in val)")
    data.add_argument("--seed", type=int, default=0, help="split seed (and the synthetic world's seed)")
    data.add_argument("--num-identities", type=int, help="stop after this many identities (synthetic: default 100)")
    data.add_argument("--prompts-per-identity", type=int, help="keep at most this many prompts (paper: 10)")
    data.add_argument("--unique-token", default="", help="dreambooth: token before the class, e.g. sks (default none)")
    data.add_argument("--subjects", help="synthetic: subjects per sample, e.g. 2 or 2,3,4 (default: single-subject "
                                         "identities)")
    data.add_argument("--subject-weights", help="synthetic: probabilities of the --subjects counts, e.g. 0.9,0.05,0.05 "
                                                "(PSR's training mix; default uniform)")
    data.add_argument("--subsets", help="psrbench: comma-separated subsets, e.g. Attribute,Three (default: all)")
    data.add_argument("--targets", action="store_true",
                      help="dreambooth, syncd, synthetic: write a target image per prompt (another photo of the same "
                           "subject; the synthetic world renders the pose the prompt asks for) for supervised "
                           "fine-tuning (objective SFTObjective)")
    data.add_argument("--strict", action="store_true", help="exit 1 if any item was skipped")
    data.add_argument("--overwrite", action="store_true",
                      help="replace the shards already in --out (without it, a folder holding shards is refused)")
    data.add_argument("--precompute", metavar="MODEL",
                      help="store each identity's text embeddings and reference latents computed by this Kontext model "
                           "(Hub id, local folder, or 'tiny'), so training can run with policy.text_encoders: false")
    data.add_argument("--precompute-resolution", type=int, default=512,
                      help="training resolution the reference latents are computed at (default 512)")
    data.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens per prompt (default 128)")
    data.add_argument("--device", default=None, help="device for --precompute (default: cuda if available)")
    data.set_defaults(func=run_data)


def _numbers(text: str | None, kind: type, flag: str) -> tuple | None:
    """``"2,3,4"`` → ``(2, 3, 4)`` (``None`` stays ``None``); a ValueError names the flag."""
    if text is None:
        return None
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a comma-separated list of {kind.__name__} values") from None


def run_data(args: argparse.Namespace) -> int:
    from divrl.data import converters as C

    if args.source != "synthetic":
        if args.src is None:
            print(f"divrl data {args.source}: --src is required (the dataset folder)", file=sys.stderr)
            return 2
        if not args.src.exists():
            print(f"divrl data {args.source}: --src {args.src} does not exist", file=sys.stderr)
            return 2
    if args.val_fraction is None:  # an evaluation benchmark goes to val whole
        args.val_fraction = 1.0 if args.source == "psrbench" else 0.0
    if not 0.0 <= args.val_fraction <= 1.0 or args.shard_size < 1:
        print("divrl data: --val-fraction must lie in [0, 1] and --shard-size be >= 1", file=sys.stderr)
        return 2
    counts = {"--num-identities": args.num_identities, "--prompts-per-identity": args.prompts_per_identity}
    bad = {flag: n for flag, n in counts.items() if n is not None and n < 1}
    if bad or args.resolution < 0:
        bad = {**bad, **({"--resolution": args.resolution} if args.resolution < 0 else {})}
        print(f"divrl data: {', '.join(f'{flag} {n}' for flag, n in bad.items())}: counts must be >= 1 and "
              f"--resolution >= 0 (0 keeps the photos' size); nothing was written", file=sys.stderr)
        return 2
    # SynCD: the release folders (*metadata.json), else DivRL's parquet copy (one image per row: no targets)
    parquet = args.source == "syncd" and (args.src.suffix == ".parquet" or (
        args.src.is_dir() and not any(args.src.rglob("*metadata.json"))))
    source = "syncd (parquet)" if parquet else args.source
    misplaced = [flag for flag, value, sources in (("--src", args.src, ("syncd", "syncd (parquet)", "dreambench",
                                                                        "dreambooth", "psrbench")),
                                                   ("--subjects", args.subjects, ("synthetic",)),
                                                   ("--subject-weights", args.subject_weights, ("synthetic",)),
                                                   ("--subsets", args.subsets, ("psrbench",)),
                                                   ("--targets", args.targets or None, ("dreambooth", "syncd",
                                                                                        "synthetic")))
                 if value is not None and source not in sources]
    if misplaced or (args.subject_weights is not None and args.subjects is None):
        print(f"divrl data {source}: {', '.join(misplaced) or '--subject-weights'} "
              f"{'applies only to other sources' if misplaced else 'needs --subjects'} (--src: every source but "
              f"synthetic, whose world is generated; --subjects and "
              f"--subject-weights: synthetic; --subsets: psrbench; --targets: dreambooth, syncd release folders (not "
              f"the parquet copy), synthetic); nothing was written", file=sys.stderr)
        return 2
    for stale in args.out.glob("*.tar.partial"):  # left by a killed conversion: never read, removed
        stale.unlink()
    old = sorted(p for pattern in ("train-*.tar", "val-*.tar") for p in args.out.glob(pattern))
    if old and not args.overwrite:
        print(f"divrl data: --out {args.out} already holds {len(old)} shard(s) (e.g. {old[0].name}); a later glob would "
              f"read old and new shards together. Pass --overwrite to replace them, or choose an empty folder",
              file=sys.stderr)
        return 2
    per = args.prompts_per_identity
    if args.source == "synthetic":
        try:
            subjects, weights = _numbers(args.subjects, int, "--subjects"), _numbers(args.subject_weights, float,
                                                                                     "--subject-weights")
            if subjects and (any(k not in (2, 3, 4) for k in subjects) or
                             (weights and (len(weights) != len(subjects) or min(weights) < 0 or sum(weights) <= 0))):
                raise ValueError(f"--subjects takes counts among 2, 3, 4 and --subject-weights one non-negative weight "
                                 f"per count, got {args.subjects} and {args.subject_weights}")
            items = C.read_synthetic(args.num_identities or 100, args.seed, per, subjects=subjects, weights=weights,
                                     targets=args.targets)
        except ValueError as err:
            print(f"divrl data synthetic: {err}; nothing was written", file=sys.stderr)
            return 2
    elif args.source == "syncd":
        items = C.read_syncd_parquet(args.src, per) if parquet else C.read_syncd(args.src, per, targets=args.targets)
    elif args.source == "dreambench":
        items = C.read_dreambench(args.src, per)
    elif args.source == "psrbench":
        items = C.read_psrbench(args.src, per, args.subsets.split(",") if args.subsets else None)
    else:
        items = C.read_dreambooth(args.src, per, args.unique_token, targets=args.targets)
    precompute = None
    if args.precompute:
        from divrl.notices import quiet_loading_bars
        from divrl.policy import KontextConfig

        quiet_loading_bars()
        policy = KontextConfig(model=args.precompute, lora=None, max_sequence_length=args.max_sequence_length).build()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        precompute = C.Precompute(policy.to(device), args.precompute_resolution)
    # --overwrite: the new shards are written beside the old ones (a hidden folder) and replace them only when the
    # conversion succeeded; a source that fails to read leaves the old shards as they were
    target = args.out / ".divrl-overwrite" if old else args.out
    try:
        report = C.convert(
            items, target, resolution=args.resolution or None, resize=args.resize, shard_size=args.shard_size,
            val_fraction=args.val_fraction, seed=args.seed, max_identities=args.num_identities, precompute=precompute,
        )
        if old and report.shards:  # a conversion that wrote nothing leaves the old shards (below)
            for path in old:
                path.unlink()
            report.shards = [path.replace(args.out / path.name) for path in report.shards]
            shutil.rmtree(target)
    except (OSError, ValueError) as err:  # a missing or unreadable source, a read-only or full --out
        if old:
            shutil.rmtree(target, ignore_errors=True)
        filename = isinstance(err, OSError) and err.filename
        writing = bool(filename) and Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(args.out))
        writing = writing and not (args.src is not None and Path(os.path.abspath(filename)).is_relative_to(
            os.path.abspath(args.src)))
        where = f"cannot write to --out {args.out} ({err.strerror}); choose a writable folder" if writing else err
        print(f"divrl data {args.source}: {where}", file=sys.stderr)
        return 2
    if not report.shards:  # every item skipped, or none listed: nothing written, and nothing replaced
        if old:
            shutil.rmtree(target, ignore_errors=True)
        first = "; ".join(f"{skip.where}: {skip.reason}" for skip in report.skipped[:3])
        why = f"{len(report.skipped)} item(s) skipped (first: {first})" if first else "it lists no item"
        print(f"divrl data {source}: nothing was converted from --src {args.src}: {why}; check the source (--out "
              f"{args.out} was left as it was)", file=sys.stderr)
        return 1
    print(report.summary())
    if args.strict and report.skipped:
        for path in report.shards:  # a strict conversion either keeps every item or leaves no shard behind
            path.unlink(missing_ok=True)
        print(f"--strict: {len(report.skipped)} item(s) skipped; the {len(report.shards)} shard(s) written were "
              f"removed; failing", file=sys.stderr)
        return 1
    return 0

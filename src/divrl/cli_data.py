"""``divrl data``: convert a published dataset layout (or the synthetic world) into identity shards."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import textwrap
from pathlib import Path

import torch

from divrl.images import MIN_SIDE


def add_data_command(commands) -> None:
    """Register ``divrl data`` on the console script's subcommands."""
    data = commands.add_parser(
        "data",
        help="convert a published dataset layout into divrl identity shards",
        formatter_class=_Help,
        description=(
            "Convert SynCD (release folders or DivRL's parquet copy), DreamBench++, DreamBooth, PSRBench or the "
            "synthetic demo world into WebDataset identity shards (schema: data/README.md). Bad items are skipped, "
            "named and counted; --strict makes any skip an error. Shards are renamed into place only when complete."
        ),
    )
    data.add_argument("source", choices=["syncd", "dreambench", "dreambooth", "psrbench", "synthetic"])
    data.add_argument("--src", type=Path, help="the dataset folder (or a SynCD .parquet file); not for synthetic")
    data.add_argument("--out", type=_out_folder, required=True, help="output folder for train-*.tar and val-*.tar")
    data.add_argument(
        "--resolution",
        type=int,
        default=512,
        help=f"reference side in pixels, >= {MIN_SIDE} (default 512; 0 keeps the source's sizes)",
    )
    data.add_argument(
        "--resize",
        choices=["pad", "crop", "stretch", "none"],
        default="pad",
        help="keep aspect and pad (default), centre crop, stretch (DivRL's training), or none",
    )
    data.add_argument("--shard-size", type=int, default=100, help="identities per shard (default 100)")
    data.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of identities in the validation split, chosen by a hash of the id (default 0; "
        "psrbench, an evaluation benchmark: 1, all in val)",
    )
    data.add_argument("--seed", type=int, default=0, help="split seed (and the synthetic world's seed)")
    data.add_argument("--num-identities", type=int, help="stop after this many identities (synthetic: default 100)")
    data.add_argument("--prompts-per-identity", type=int, help="keep at most this many prompts (paper: 10)")
    data.add_argument("--unique-token", default="", help="dreambooth: token before the class, e.g. sks (default none)")
    data.add_argument(
        "--subjects", help="synthetic: subjects per sample, e.g. 2 or 2,3,4 (default: single-subject identities)"
    )
    data.add_argument(
        "--subject-weights",
        help="synthetic: probabilities of the --subjects counts, e.g. 0.9,0.05,0.05 "
        "(PSR's training mix; default uniform); --subject-weights=-1,2 and "
        "--subject-weights -1,2 both give the value -1,2",
    )
    data.add_argument("--subsets", help="psrbench: comma-separated subsets, e.g. Attribute,Three (default: all)")
    data.add_argument(
        "--targets",
        action="store_true",
        help="dreambooth, syncd, synthetic: write a target image per prompt (another photo of the same "
        "subject; the synthetic world renders the pose the prompt asks for) for supervised "
        "fine-tuning (objective SFTObjective)",
    )
    data.add_argument("--strict", action="store_true", help="exit 1 if any item was skipped")
    data.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards already in --out (without it, a folder holding shards is refused)",
    )
    data.add_argument(
        "--precompute",
        metavar="MODEL",
        help="store each identity's text embeddings and reference latents computed by this model (Hub "
        "id or local folder of any model family's pipeline, the family read from its model_index.json; "
        "'tiny': the tiny Kontext), so training can run with "
        "policy.text_encoders: false",
    )
    data.add_argument(
        "--precompute-resolution",
        type=int,
        default=512,
        help=f"training resolution the reference latents are computed at, >= {MIN_SIDE} (default 512)",
    )
    data.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="text tokens per prompt for --precompute (default: the family config's "
        "max_sequence_length, e.g. Kontext 128); the training config's policy.max_sequence_length "
        "must be the same (the shipped configs/explore*.yaml name theirs)",
    )
    data.add_argument("--device", default=None, help="device for --precompute (default: cuda if available)")
    data.set_defaults(func=run_data)
    data.parse_known_args = _equals_form(data.parse_known_args, ("--subjects", "--subject-weights"))


class _Help(argparse.HelpFormatter):
    """``--help`` that never breaks a flag at its hyphens (``--subject-`` / ``weights=-1,2``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _equals_form(parse, flags: tuple[str, ...]):
    """``parse`` (the data parser's ``parse_known_args``, which the console script's parser calls with the arguments
    after ``data``) reading ``--subject-weights -1,2`` as ``--subject-weights=-1,2``: argparse takes a value that
    starts with '-' (and is no plain negative number) for an option, and would answer "expected one argument" instead
    of the flag's own check."""

    def parse_known_args(args=None, namespace=None):
        if args is not None:
            args, given = [], list(args)
            while given:
                flag = given.pop(0)
                if flag == "--":  # everything after it is positional
                    args += [flag, *given]
                    break
                value = given[0] if given else ""
                if flag in flags and value[:1] == "-" and value[1:2] not in ("", "-", "h"):
                    flag = f"{flag}={given.pop(0)}"
                args.append(flag)
        return parse(args, namespace)

    return parse_known_args


def _out_folder(text: str) -> Path:
    """``--out``: a folder name; an empty one (which would write the shards into the current folder) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"must name a folder, got {text!r} (the shards would land in the current "
            f"folder); give one, e.g. --out data/shards (--out . for the current folder)"
        )
    return Path(text)


def file_name(text: str) -> Path:
    """A file flag (``divrl score --json``): a path ending with a separator, a folder to be, is refused (``Path``
    would drop the separator and write a file named like the folder)."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} ends with a path separator; give a file name, e.g. {text}scores.json")
    return Path(text)


def _out_of_range(args: argparse.Namespace) -> list[str]:
    """One sentence per numeric flag out of its range (naming the flag and the value), ``--device`` included."""
    wrong = [
        f"{flag} {value} must be >= 1"
        for flag, value in (
            ("--num-identities", args.num_identities),
            ("--prompts-per-identity", args.prompts_per_identity),
            ("--shard-size", args.shard_size),
            ("--precompute-resolution", args.precompute_resolution),
            ("--max-sequence-length", args.max_sequence_length),
        )
        if value is not None and value < 1
    ]
    if args.resolution < 0:
        wrong.append(f"--resolution {args.resolution} must be >= 0 (0 keeps the photos' size)")
    elif 0 < args.resolution < MIN_SIDE:
        wrong.append(
            f"--resolution {args.resolution} must be 0 (keep the source's sizes) or >= {MIN_SIDE} ({_SMALL}), e.g. 512"
        )
    if not (math.isfinite(args.val_fraction) and 0.0 <= args.val_fraction <= 1.0):
        wrong.append(f"--val-fraction {args.val_fraction} must be a share in [0, 1]")
    device = _device_error(args.device) if args.device is not None else None
    return [*wrong, device] if device else wrong


def _device_error(text: str) -> str | None:
    """Why ``--device`` cannot be used on this machine (not a device string, or a device this machine lacks)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is None or not hasattr(backend, "is_available"):
        return None
    count = (backend.device_count() if hasattr(backend, "device_count") else 1) if backend.is_available() else 0
    if count == 0:
        return f"--device {text}: this machine has no {device.type} device; use --device cpu"
    if device.index is not None and device.index >= count:
        return (
            f"--device {text}: this machine has {count} {device.type} device(s), {device.type}:0 .. "
            f"{device.type}:{count - 1}; pick one of them (or --device cpu)"
        )
    return None


_SMALL = (
    f"divrl sample and score refuse images under {MIN_SIDE}x{MIN_SIDE} pixels: DINOv2 reads 14-pixel patches, "
    f"the dense descriptor 8-pixel cells"
)
"""Why a side under :data:`~divrl.images.MIN_SIDE` is refused (``--resolution``, ``--precompute-resolution``)."""

FOLDERS = {
    "syncd": "a SynCD release folder (its *metadata.json files) or DivRL's parquet copy (a .parquet file or a folder "
    "of them)",
    "dreambench": "the DreamBench++ folder (holding data/images and data/captions)",
    "dreambooth": "the DreamBooth dataset folder (prompts_and_classes.txt and one folder per subject)",
    "psrbench": "the PSRBench folder (the <Subset>.json files with subjects/ and animals/)",
}
"""What ``--src`` names for each source (all of them folders; SynCD's parquet copy may be a single file)."""


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
        if args.src.is_file() and not (args.source == "syncd" and args.src.suffix == ".parquet"):
            print(
                f"divrl data {args.source}: --src {args.src} is a file; {args.source} reads "
                f"{FOLDERS[args.source]}: pass it as --src; nothing was written",
                file=sys.stderr,
            )
            return 2
    if args.val_fraction is None:  # an evaluation benchmark goes to val whole
        args.val_fraction = 1.0 if args.source == "psrbench" else 0.0
    wrong = _out_of_range(args)
    if wrong:
        print(f"divrl data: {'; '.join(wrong)}; nothing was written", file=sys.stderr)
        return 2
    # SynCD: the release folders (*metadata.json), else DivRL's parquet copy (one image per row: no targets)
    parquet = args.source == "syncd" and (
        args.src.suffix == ".parquet" or (args.src.is_dir() and not any(args.src.rglob("*metadata.json")))
    )
    source = "syncd (parquet)" if parquet else args.source
    misplaced = [
        flag
        for flag, value, sources in (
            ("--src", args.src, ("syncd", "syncd (parquet)", "dreambench", "dreambooth", "psrbench")),
            ("--subjects", args.subjects, ("synthetic",)),
            ("--subject-weights", args.subject_weights, ("synthetic",)),
            ("--subsets", args.subsets, ("psrbench",)),
            ("--unique-token", args.unique_token or None, ("dreambooth",)),
            ("--targets", args.targets or None, ("dreambooth", "syncd", "synthetic")),
        )
        if value is not None and source not in sources
    ]
    if misplaced or (args.subject_weights is not None and args.subjects is None):
        print(
            f"divrl data {source}: {', '.join(misplaced) or '--subject-weights'} "
            f"{'applies only to other sources' if misplaced else 'needs --subjects'} (--src: every source but "
            f"synthetic, whose world is generated; --subjects and "
            f"--subject-weights: synthetic; --subsets: psrbench; --unique-token: dreambooth; --targets: dreambooth, "
            f"syncd release folders (not the parquet copy), synthetic); nothing was written",
            file=sys.stderr,
        )
        return 2
    old = sorted(p for pattern in ("train-*.tar", "val-*.tar") for p in args.out.glob(pattern))
    foreign = next(((path, why) for path in old if (why := C.shard_error(path))), None)
    if foreign:  # named like a shard but not one divrl wrote: never replaced, never read with the new shards
        print(
            f"divrl data {source}: --out {args.out} holds {foreign[0].name}, which is not a divrl shard "
            f"({foreign[1]}) though named like one (train-*.tar, val-*.tar: "
            f"{'--overwrite would delete it' if args.overwrite else 'training would read it with the new shards'}); "
            f"move it away or choose another --out; nothing was written",
            file=sys.stderr,
        )
        return 2
    if old and not args.overwrite:
        print(
            f"divrl data: --out {args.out} already holds {len(old)} divrl shard(s) (e.g. {old[0].name}); a later "
            f"glob would read old and new shards together. Pass --overwrite to replace them, or choose an empty "
            f"folder",
            file=sys.stderr,
        )
        return 2
    for stale in args.out.glob("*.tar.partial"):  # a shard a killed conversion left half-written: never read, removed
        if C.is_stale_partial(stale):  # train-000000.tar.partial, ...; any other .partial file is the user's
            stale.unlink()
    per = args.prompts_per_identity
    if args.source == "synthetic":
        try:
            subjects, weights = (
                _numbers(args.subjects, int, "--subjects"),
                _numbers(args.subject_weights, float, "--subject-weights"),
            )
            if subjects and any(k not in (2, 3, 4) for k in subjects):
                raise ValueError(f"--subjects takes counts among 2, 3, 4, got {args.subjects}")
            if weights and len(weights) != len(subjects):
                raise ValueError(
                    f"--subject-weights {args.subject_weights} gives {len(weights)} weight(s) for the "
                    f"{len(subjects)} counts of --subjects {args.subjects}: give one non-negative weight "
                    f"per count"
                )
            if weights and not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(
                    f"--subject-weights {args.subject_weights}: every weight must be a finite number "
                    f">= 0 (a probability of its --subjects count)"
                )
            if weights and sum(weights) <= 0:
                raise ValueError(
                    f"--subject-weights {args.subject_weights} sum to 0: give at least one --subjects "
                    f"count a positive weight"
                )
            items = C.read_synthetic(
                args.num_identities or 100, args.seed, per, subjects=subjects, weights=weights, targets=args.targets
            )
        except ValueError as err:
            print(f"divrl data synthetic: {err}; nothing was written", file=sys.stderr)
            return 2
    elif args.source == "syncd":
        try:  # the parquet copy's files are checked by the call, before anything is written
            items = (
                C.read_syncd_parquet(args.src, per) if parquet else C.read_syncd(args.src, per, targets=args.targets)
            )
        except ValueError as err:
            print(
                f"divrl data {source}: --src {err if args.src.is_file() else f'{args.src}: {err}'}; syncd's --src "
                f"takes {FOLDERS['syncd']}; nothing was written",
                file=sys.stderr,
            )
            return 2
    elif args.source == "dreambench":
        items = C.read_dreambench(args.src, per)
    elif args.source == "psrbench":
        items = C.read_psrbench(args.src, per, args.subsets.split(",") if args.subsets else None)
    else:
        items = C.read_dreambooth(args.src, per, args.unique_token, targets=args.targets)
    precompute = None
    if args.precompute:
        from divrl.notices import quiet_loading_bars
        from divrl.policy.loading import precompute_config

        quiet_loading_bars()
        length = {} if args.max_sequence_length is None else {"max_sequence_length": args.max_sequence_length}
        policy = precompute_config(args.precompute, **length).build()
        multiple = policy.vae_scale_factor * 2  # known once the model is loaded; before any identity is converted
        need = (
            [
                (
                    f"a multiple of {multiple} for {args.precompute} (its VAE's factor {policy.vae_scale_factor} x 2 "
                    f"for packing)"
                )
            ]
            if args.precompute_resolution % multiple
            else []
        )
        need += [f">= {MIN_SIDE} ({_SMALL})"] if args.precompute_resolution < MIN_SIDE else []
        if need:  # the factor is known once the model is loaded
            print(
                f"divrl data {source}: --precompute-resolution {args.precompute_resolution} must be "
                f"{' and '.join(need)}, e.g. 512; nothing was written",
                file=sys.stderr,
            )
            return 2
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        precompute = C.Precompute(policy.to(device), args.precompute_resolution)
    # --overwrite: the new shards are written beside the old ones (a hidden folder) and replace them only when the
    # conversion succeeded; a source that fails to read leaves the old shards as they were
    target = args.out / ".divrl-overwrite" if old else args.out
    committing = False  # once the new shards start replacing the old ones, nothing written is removed any more
    try:
        report = C.convert(
            items,
            target,
            resolution=args.resolution or None,
            resize=args.resize,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_identities=args.num_identities,
            precompute=precompute,
        )
        failed = not report.shards or (args.strict and report.skipped)  # the old shards stay (below)
        if old and not failed:
            committing = True
            names = {path.name for path in report.shards}  # moved in first (a same-named old shard is replaced)...
            report.shards = [path.replace(args.out / path.name) for path in report.shards]
            for path in old:  # ...then the old shards no new one replaced go
                if path.name not in names:
                    path.unlink()
            shutil.rmtree(target)
    except (OSError, ValueError) as err:  # a missing or unreadable source, a read-only or full --out
        if committing:
            print(
                f"divrl data {args.source}: replacing the shards in --out {args.out} failed ({err}); the new shards "
                f"not moved yet are in {target}: move them into --out, or run the conversion again",
                file=sys.stderr,
            )
            return 2
        if old:
            shutil.rmtree(target, ignore_errors=True)
        filename = isinstance(err, OSError) and err.filename
        writing = bool(filename) and Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(args.out))
        writing = writing and not (
            args.src is not None and Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(args.src))
        )
        where = f"cannot write to --out {args.out} ({err.strerror}); choose a writable folder" if writing else err
        print(f"divrl data {args.source}: {where}", file=sys.stderr)
        return 2
    except BaseException:  # anything else (a --precompute model that fails, Ctrl-C): the old shards stay as they were
        if old and not committing:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if not report.shards:  # every item skipped, or none listed: nothing written, and nothing replaced
        if old:
            shutil.rmtree(target, ignore_errors=True)
        first = "; ".join(f"{skip.where}: {skip.reason}" for skip in report.skipped[:3])
        why = f"{len(report.skipped)} item(s) skipped (first: {first})" if first else "it lists no item"
        print(
            f"divrl data {source}: nothing was converted from --src {args.src}: {why}; check the source (--out "
            f"{args.out} was left as it was)",
            file=sys.stderr,
        )
        return 1
    print(report.summary())
    if args.strict and report.skipped:
        for path in report.shards:  # a strict conversion either keeps every item or leaves no shard behind
            path.unlink(missing_ok=True)
        if old:  # written aside: the old shards were never touched
            shutil.rmtree(target, ignore_errors=True)
        kept = f"; --out {args.out} was left as it was ({len(old)} old shard(s))" if old else ""
        print(
            f"--strict: {len(report.skipped)} item(s) skipped; the {len(report.shards)} shard(s) written were "
            f"removed{kept}; failing",
            file=sys.stderr,
        )
        return 1
    return 0

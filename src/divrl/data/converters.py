"""Converters from the layouts the field publishes to divrl's identity shards (``divrl data``).

Each source is a generator of :class:`Item` s: an :class:`~divrl.data.schema.IdentityRecord`, or a :class:`Skip`
naming the file and the reason it could not be used. :func:`convert` applies the resize policy, drops duplicate
identity ids, splits identities deterministically into train and validation, writes shards atomically (a ``.partial``
name renamed when complete) and returns a :class:`ConversionReport`.

Layouts (``docs/reference.md``, "Data layouts"):

- **syncd** — the SynCD release: every ``*metadata.json`` under ``--src`` is one identity, listing ``filenames``
  (images in the JSON's folder; the first becomes the reference) and ``prompts``; masks in
  ``<folder>/masks/<image stem>.jpg``. With ``targets=True`` prompt ``p`` gets another view as its target image
  (see :func:`read_syncd` for the pairing). Or a parquet file (DivRL's filtered copy): one identity per row, columns
  ``image``, ``mask`` (encoded image bytes) and ``caption`` (newline-separated; a first header line is dropped when
  there are several; no targets: one image per row).
- **dreambench** — DreamBench++: ``data/images/<category>/NN.jpg`` and ``data/captions/<category>/NN.txt`` (line 1
  the subject name, then the prompts); the category is kept.
- **dreambooth** — ``<subject>/NN.jpg`` and ``prompts_and_classes.txt`` (subject → class; 25 object and 25
  live-subject templates ``'a {0} {1} ...'.format(unique_token, class_token)``), instantiated with the class. With
  ``targets=True`` prompt ``p``'s target is the subject's other photo ``photos[1 + p % (len(photos) - 1)]``.
- **psrbench** — PSRBench (PSR, arXiv 2512.01236; evaluation only): ``<Subset>.json`` for the seven subsets
  (Attribute, Action, Background, Position, Complex, Three, Four), each a JSON list of samples with ``instruction``
  (the prompt), ``input_path`` (reference images relative to ``--src``: ``subjects/...``, ``animals/...``) and
  ``category1`` .. ``categoryN`` (each reference's category word, what PSR prompts Grounding DINO with). One
  multi-subject identity per sample, ``<subset>/<index>``; the category words go to ``extra["subjects"]`` and the
  subset (lower case) is the category, so evaluation tables break down by subset.
- **synthetic** — the procedural subjects of :mod:`divrl.data.synthetic`; with ``targets=True`` each prompt's target
  renders the subject in the pose the prompt asks for.

Targets (``target_<p>.png``, for supervised fine-tuning) are resized with the references by :func:`resize_record`. A
target photo that cannot be read is reported as a :class:`Skip` naming the file (and the prompts left without a
target); the identity itself is still converted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageOps

from divrl.data.schema import IdentityRecord, check_identity_id, image_error
from divrl.data.synthetic import multi_subject_records, synthetic_records, write_shards
from divrl.images import BACKGROUND, in_mode  # noqa: F401 - BACKGROUND: the colour transparency is composited on

__all__ = [
    "Skip",
    "ConversionReport",
    "convert",
    "resize_record",
    "split_of",
    "read_syncd",
    "read_syncd_parquet",
    "read_dreambench",
    "read_dreambooth",
    "read_psrbench",
    "PSRBENCH_SUBSETS",
    "Precompute",
    "SOURCES",
    "shard_error",
    "is_stale_partial",
]

RESIZE_POLICIES = ("pad", "crop", "stretch", "none")
LIVE_CLASSES = {"dog", "cat"}  # DreamBooth's live subjects get the live-subject templates


@dataclass
class Skip:
    """An input item that could not be converted: where it is and why.

    Attributes:
        where: the file, folder or row that could not be used.
        reason: why, in words.
    """

    where: str
    reason: str


Item = IdentityRecord | Skip


@dataclass
class ConversionReport:
    """What a conversion did: identities written per split, the shards, and every skipped item with its reason.

    Attributes:
        converted: identities written per split (``train``, ``val``).
        skipped: every skipped input item, in order.
        shards: the shards written, in order.
    """

    converted: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped: list[Skip] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)

    def summary(self, limit: int = 20) -> str:
        """The closing summary: counts, then the first ``limit`` skipped items with their reasons."""
        lines = [
            f"converted {sum(self.converted.values())} identities (train {self.converted['train']}, val "
            f"{self.converted['val']}) into {len(self.shards)} shard(s); skipped {len(self.skipped)}"
        ]
        lines += [f"  skipped {s.where}: {s.reason}" for s in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- helpers


def _open_image(path: Path | bytes, mode: str, where: str, alpha: list | None = None) -> Image.Image | Skip:
    """The image in ``mode`` as :func:`divrl.images.in_mode` reads it (upright, 16-bit scaled to 8 bits,
    transparency composited on :data:`BACKGROUND`, its alpha appended to ``alpha``: the same reader as ``divrl
    sample`` and ``divrl score``), or a :class:`Skip` naming ``where``."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as image:
            image.load()
            return in_mode(image, mode, alpha)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return Skip(where, f"unreadable image ({image_error(err)})")


def _identity_id(text: str) -> str:
    """A shard-safe identity id from a path or name (``dog/00`` stays, ``a b.c`` → ``a_b_c``)."""
    return re.sub(r"[^A-Za-z0-9_/-]+", "_", text).strip("_/") or "identity"


def split_of(identity_id: str, val_fraction: float, seed: int) -> str:
    """``"val"`` or ``"train"``, a pure function of the id and the seed (stable across runs, sources and machines)."""
    digest = hashlib.sha256(f"{seed}:{identity_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def resize_record(record: IdentityRecord, resolution: int | None, policy: str) -> IdentityRecord:
    """Resize every reference (and its mask) to ``resolution``² by ``policy``: ``pad`` keeps the aspect and pads with
    the reference's border mean colour (mask padded with 0), ``crop`` centre-crops, ``stretch`` ignores the aspect
    (DivRL's 512×512 training), ``none`` keeps the images. Target and rejected images (``target_<p>.png``,
    ``rejected_<p>.png``) are resized the same way, each padded with its own border colour. Returns a new record;
    the other fields are kept."""
    if resolution is None or policy == "none":
        return record
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    size = (resolution, resolution)

    def one(image: Image.Image, fill) -> Image.Image:
        if policy == "stretch":
            return image.resize(size, Image.LANCZOS)
        if policy == "crop":
            return ImageOps.fit(image, size, Image.LANCZOS)
        return ImageOps.pad(image, size, Image.LANCZOS, color=fill)

    references = [one(reference, _border_colour(reference)) for reference in record.references]
    masks = [one(mask, 0) if mask is not None else None for mask in record.masks]
    targets, rejected = (
        {p: one(image, _border_colour(image)) for p, image in images.items()}
        for images in (record.targets, record.rejected)
    )
    return replace(record, references=references, masks=masks, targets=targets, rejected=rejected)


def _border_colour(image: Image.Image) -> tuple[int, int, int]:
    w, h = image.size
    pixels = [image.getpixel((x, y)) for x in (0, w - 1) for y in range(0, h, max(1, h // 16))]
    return tuple(sum(p[c] for p in pixels) // len(pixels) for c in range(3))


def read_utf8(path: Path) -> str:
    """A text file's content; one that is not UTF-8 raises a ``ValueError`` naming the file, the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the first prompt
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); "
            f"save the file as UTF-8"
        ) from None


def _read_lines(path: Path, where: str) -> list[str] | Skip:
    if not path.is_file():
        return Skip(where, f"prompt file {path} is missing")
    try:
        lines = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        return Skip(where, f"prompt file unreadable: {err}")
    return lines or Skip(where, f"prompt file {path} has no prompts")


def _other_view(prompt: int, views: int) -> int:
    """The view paired with ``prompt`` when the prompts are not aligned with the views: view 0 is the reference, so
    prompts cycle over views 1 .. ``views - 1``."""
    return 1 + prompt % (views - 1)


def _open_targets(pairs: dict[int, Path]) -> tuple[dict[int, Image.Image], list[Skip]]:
    """Open the target photo of each prompt (``{prompt: path}``) as the references are opened; a photo that cannot be
    read gives one :class:`Skip` naming it and the prompts left without a target (the identity is still usable)."""
    opened: dict[Path, Image.Image | Skip] = {}
    for path in pairs.values():
        if path not in opened:
            opened[path] = _open_image(path, "RGB", str(path))
    targets = {p: opened[path] for p, path in pairs.items() if not isinstance(opened[path], Skip)}
    skips = []
    for path, image in opened.items():
        if isinstance(image, Skip):
            lost = ", ".join(str(p) for p, other in pairs.items() if other == path)
            skips.append(Skip(image.where, f"{image.reason}; prompt(s) {lost} converted without a target"))
    return targets, skips


# ---------------------------------------------------------------------------------------------------- sources


_JSON_KINDS = {str: "string", dict: "object", type(None): "null", int: "number", float: "number", bool: "boolean"}


def _not_strings(key: str, value) -> str:
    """Why the metadata's ``key`` is not a JSON list of strings (its JSON kind, or its first non-string entry)."""
    if not isinstance(value, list):
        return f"{key!r} is a JSON {_JSON_KINDS.get(type(value), 'value')}"
    return f"{key!r} holds a non-string entry {next(v for v in value if not isinstance(v, str))!r}"


def read_syncd(src: Path, prompts_per_identity: int | None = None, targets: bool = False) -> Iterator[Item]:
    """SynCD release layout: one identity per ``*metadata.json`` (see the module docstring).

    View 0 (``filenames[0]``) is the reference. With ``targets=True`` each kept prompt gets another view of the
    subject as its target image (``target_<p>.png``):

    - when the JSON lists as many prompts as images (SynCD generated image ``i`` from prompt ``i``), prompt ``i``'s
      target is ``filenames[i]`` for ``i >= 1``; prompt 0 (the reference's own prompt) has none;
    - otherwise prompt ``p``'s target is ``filenames[1 + p % (len(filenames) - 1)]``, cycling over the other views;
    - an identity with a single image has no targets.

    The pairing is decided on the JSON's lists (blank prompts, which are dropped, keep their place in the
    alignment); targets are keyed by the index of the prompt in the record, so ``prompts_per_identity`` (which keeps
    the first prompts) keeps exactly the targets of the kept prompts. A target image that cannot be read is a
    :class:`Skip` naming it; the identity is converted without that target.
    """
    for meta_path in sorted(src.rglob("*metadata.json")):
        where = str(meta_path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            filenames, listed = meta["filenames"], meta["prompts"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            yield Skip(where, f"metadata unreadable or without 'filenames' / 'prompts' ({type(err).__name__}: {err})")
            continue
        # a string would be read as a list of characters: one prompt per letter, one image per letter
        wrong = [
            _not_strings(key, value)
            for key, value in (("filenames", filenames), ("prompts", listed))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ]
        if wrong:
            yield Skip(where, f"{' and '.join(wrong)}; 'filenames' and 'prompts' must be JSON lists of strings")
            continue
        kept = [i for i, p in enumerate(listed) if p.strip()][:prompts_per_identity]
        prompts = [listed[i] for i in kept]
        if not filenames:
            yield Skip(where, "metadata lists no images")
            continue
        if not prompts:
            yield Skip(where, "metadata lists no prompts")
            continue
        folder = meta_path.parent
        reference_path = folder / filenames[0]
        reference = _open_image(reference_path, "RGB", str(reference_path))
        if isinstance(reference, Skip):
            yield reference
            continue
        mask_path = folder / "masks" / f"{Path(filenames[0]).stem}.jpg"
        mask = _open_image(mask_path, "L", str(mask_path)) if mask_path.is_file() else None
        if isinstance(mask, Skip):
            yield mask
            continue
        if mask is None:
            yield Skip(str(mask_path), "mask is missing (SynCD ships a mask per image)")
            continue
        stem = meta_path.name[: -len("metadata.json")].rstrip("_-.")  # "<id>_metadata.json" or "metadata.json"
        identity = _identity_id(str((folder / stem if stem else folder).relative_to(src)))
        paired: dict[int, Image.Image] = {}
        if targets and len(filenames) > 1:
            aligned = len(listed) == len(filenames)
            views = {p: i if aligned else _other_view(p, len(filenames)) for p, i in enumerate(kept)}
            paired, skips = _open_targets({p: folder / filenames[v] for p, v in views.items() if v >= 1})
            yield from skips
        yield IdentityRecord(
            identity,
            reference,
            prompts,
            mask.resize(reference.size),
            source="syncd",
            category="object",
            license="MIT",
            extra={"views": filenames[1:], "origin": str(meta_path.relative_to(src))},
            targets=paired,
        )


def read_syncd_parquet(src: Path, prompts_per_identity: int | None = None) -> Iterator[Item]:
    """DivRL's filtered SynCD copy: parquet rows with ``image``, ``mask``, ``caption`` (needs ``pyarrow``).

    Raises:
        ValueError: a file (``src`` or one under it) that is not a Parquet file, naming it; raised by the call, before
            any row is read.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading SynCD parquet files needs pyarrow: pip install pyarrow") from err
    files = sorted(f for f in src.rglob("*.parquet") if f.is_file()) if src.is_dir() else [src]
    for file in files:  # every file's footer first: one that is not Parquet stops the call before any row is read
        try:
            pq.read_metadata(file)
        except pa.ArrowInvalid as err:  # "Parquet magic bytes not found in footer..." and the like
            raise ValueError(f"{file} is not a Parquet file (pyarrow: {str(err).splitlines()[0]})") from None
    return _syncd_parquet_rows(pq, files, prompts_per_identity)


def _syncd_parquet_rows(pq, files: list[Path], prompts_per_identity: int | None) -> Iterator[Item]:
    for file in files:
        table = pq.read_table(file)
        missing = {"image", "mask", "caption"} - set(table.column_names)
        if missing:
            yield Skip(str(file), f"parquet file lacks column(s) {sorted(missing)}")
            continue
        for row, record in enumerate(table.to_pylist()):
            where = f"{file}#row{row}"
            image, mask = (_bytes(record[k]) for k in ("image", "mask"))
            reference = (
                _open_image(image, "RGB", f"{where} column 'image'")
                if image is not None
                else Skip(where, "no image bytes")
            )
            if isinstance(reference, Skip):
                yield reference
                continue
            subject_mask = (
                _open_image(mask, "L", f"{where} column 'mask'") if mask is not None else Skip(where, "mask is missing")
            )
            if isinstance(subject_mask, Skip):
                yield subject_mask
                continue
            lines = [line.strip() for line in str(record["caption"] or "").splitlines() if line.strip()]
            prompts = lines[1:] if len(lines) > 1 else lines
            if not prompts:
                yield Skip(where, "empty caption")
                continue
            yield IdentityRecord(
                _identity_id(f"{file.stem}/{row:06d}"),
                reference,
                prompts[:prompts_per_identity],
                subject_mask.resize(reference.size),
                source="syncd",
                category="object",
                license="MIT",
            )


def _bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return bytes(value) if value is not None else None


def read_dreambench(src: Path, prompts_per_identity: int | None = None) -> Iterator[Item]:
    """DreamBench++: ``data/images/<category>/NN.jpg`` with ``data/captions/<category>/NN.txt``."""
    root = src / "data" if (src / "data" / "images").is_dir() else src
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(
            f"dreambench: {images} does not exist; pass the folder holding data/images and data/captions"
        )
    for path in _listing(images):
        if isinstance(path, Skip):
            yield path
            continue
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        category = path.parent.name
        where = str(path)
        caption = _read_lines(root / "captions" / category / f"{path.stem}.txt", where)
        if isinstance(caption, Skip):
            yield caption
            continue
        if len(caption) < 2:
            yield Skip(where, "caption file has a subject name but no prompts")
            continue
        alpha: list[Image.Image] = []
        reference = _open_image(path, "RGB", where, alpha)
        if isinstance(reference, Skip):
            yield reference
            continue
        yield IdentityRecord(
            _identity_id(f"{category}/{path.stem}"),
            reference,
            caption[1 : prompts_per_identity and prompts_per_identity + 1],
            alpha[0] if alpha else None,
            source="dreambench",
            category=category,
            license="Apache-2.0",
            extra={"subject": caption[0]},
        )


def _listing(images: Path) -> Iterator[Path | Skip]:
    """``images/<category>/*`` sorted; an unreadable category folder is reported, not silently passed over."""
    for category in sorted(p for p in images.iterdir() if p.is_dir()):
        try:
            yield from sorted(category.iterdir())
        except OSError as err:
            yield Skip(str(category), f"unreadable folder ({type(err).__name__}: {err})")


def dreambooth_templates(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse ``prompts_and_classes.txt``: subject → class, the object templates and the live-subject templates."""
    text = read_utf8(path)
    classes = dict(re.findall(r"^([A-Za-z0-9_]+),([^,\n]+)$", text.split("Prompts")[0], flags=re.M))
    classes.pop("subject_name", None)
    lists = re.findall(r"prompt_list\s*=\s*\[(.*?)\]", text, flags=re.S)
    if len(lists) != 2 or not classes:
        raise ValueError(f"{path}: expected a class table and two prompt lists (object, live subject)")
    object_t, live_t = ([t for t in re.findall(r"'([^']*)'\.format", block)] for block in lists)
    return classes, object_t, live_t


def read_dreambooth(
    src: Path, prompts_per_identity: int | None = None, unique_token: str = "", targets: bool = False
) -> Iterator[Item]:
    """DreamBooth: one identity per subject folder, reference ``00.jpg`` (the first photo), the class's templates.

    With ``targets=True`` prompt ``p``'s target image (``target_<p>.png``) is the subject's other photo
    ``photos[1 + p % (len(photos) - 1)]`` (photos in name order; the prompts cycle over the photos after the
    reference); a subject with a single photo has no targets and is still converted. A target photo that cannot be
    read is a :class:`Skip` naming it; the subject is converted without that target.
    """
    table = src / "prompts_and_classes.txt"
    if not table.is_file():
        raise FileNotFoundError(f"dreambooth: {table} is missing; it maps subjects to classes and holds the templates")
    classes, object_templates, live_templates = dreambooth_templates(table)
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        try:
            photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        except OSError as err:
            yield Skip(str(folder), f"unreadable folder ({type(err).__name__}: {err})")
            continue
        if not photos:
            yield Skip(str(folder), "no photos")
            continue
        if folder.name not in classes:
            yield Skip(str(folder), "subject not listed in prompts_and_classes.txt")
            continue
        cls = classes[folder.name].strip()
        templates = live_templates if cls in LIVE_CLASSES else object_templates
        prompts = [" ".join(t.format(unique_token, cls).split()) for t in templates][:prompts_per_identity]
        alpha: list[Image.Image] = []
        reference = _open_image(photos[0], "RGB", str(photos[0]), alpha)
        if isinstance(reference, Skip):
            yield reference
            continue
        paired: dict[int, Image.Image] = {}
        if targets and len(photos) > 1:
            paired, skips = _open_targets({p: photos[_other_view(p, len(photos))] for p in range(len(prompts))})
            yield from skips
        yield IdentityRecord(
            _identity_id(folder.name),
            reference,
            prompts,
            alpha[0] if alpha else None,
            source="dreambooth",
            category="live" if cls in LIVE_CLASSES else "object",
            license="CC-BY-4.0",
            extra={"class": cls, "views": [p.name for p in photos[1:]]},
            targets=paired,
        )


def read_synthetic(
    num_identities: int,
    seed: int,
    prompts_per_identity: int | None,
    size: int = 128,
    subjects: tuple[int, ...] | None = None,
    weights: tuple[float, ...] | None = None,
    targets: bool = False,
) -> Iterator[Item]:
    """The procedural subjects of :func:`~divrl.data.synthetic.synthetic_records` (4 prompts each by default; with
    ``targets`` a target image per prompt, the subject in the pose the prompt asks for), or with ``subjects``
    (counts, e.g. ``(2,)`` or ``(2, 3, 4)``, drawn with ``weights``, default uniform) the multi-subject conditions of
    :func:`~divrl.data.synthetic.multi_subject_records`.

    Raises:
        ValueError: ``targets`` with ``subjects`` (multi-subject records have no targets); raised by the call, before
            any record is drawn.
    """
    per = prompts_per_identity or 4
    if subjects:
        if targets:
            raise ValueError(
                "targets=True (--targets) is for single-subject synthetic identities: the multi-subject "
                "records (subjects / --subjects) have no target images"
            )
        return multi_subject_records(
            num_identities, size=size, prompts_per_identity=per, seed=seed, subjects=tuple(subjects), weights=weights
        )
    return synthetic_records(num_identities, size=size, prompts_per_identity=per, seed=seed, targets=targets)


PSRBENCH_SUBSETS = ("Attribute", "Action", "Background", "Position", "Complex", "Three", "Four")
"""PSRBench's subsets, in its README's order; each is ``<subset>.json`` in the benchmark folder."""

PSRBENCH_RELATIONS = (
    "to the left of",
    "to the right of",
    "on the left of",
    "on the right of",
    "on top of",
    "above",
    "below",
    "under",
    "next to",
    "near",
)
"""The spatial phrases PSR's position score understands; a Position prompt's first one is kept as ``relation``."""


def read_psrbench(
    src: Path, prompts_per_identity: int | None = None, subsets: Iterable[str] | None = None
) -> Iterator[Item]:
    """PSRBench: one multi-subject identity per sample of ``<src>/<Subset>.json`` (see the module docstring).

    A sample is a JSON object with ``instruction`` (the prompt), ``input_path`` (``input_paths`` is accepted too: the
    PSR README spells it so) listing the reference images relative to ``src``, and ``category1`` .. ``categoryN``,
    the category word of each reference. The identity ``<subset lower>/<index>`` (``attribute/007``: the sample's
    position in its file, as PSR's scripts count) has the references in the file's order, the alpha channel of a
    transparent reference as its mask, the prompt, and ``extra``: ``subjects`` (the category words, one per
    reference), ``subset``, ``index``, ``reference_paths`` (as the JSON gives them), for Position the spatial
    ``relation`` found in the prompt (read as "subjects[0] <relation> subjects[1]", as PSR's position score does)
    and any further fields of the sample under ``fields``. ``prompts_per_identity`` is accepted for symmetry with
    the other sources (a sample has one prompt).

    Args:
        src: the benchmark folder (the ``*.json`` files, ``subjects/`` and ``animals/``).
        prompts_per_identity: unused beyond the first prompt.
        subsets: the subsets to read (names as in :data:`PSRBENCH_SUBSETS`, any case); default every one present.

    Raises:
        FileNotFoundError: no subset JSON in ``src`` (or a subset asked for by name is missing).
        ValueError: an unknown subset name, or a JSON file that is not valid JSON or not a list of samples.
    """
    wanted = PSRBENCH_SUBSETS
    if subsets is not None:
        names = {name.lower(): name for name in PSRBENCH_SUBSETS}
        asked = [s.strip() for s in subsets if s.strip()]
        unknown = [s for s in asked if s.lower() not in names]
        if unknown or not asked:
            raise ValueError(
                f"psrbench: unknown subset(s) {unknown or asked}; choose among {', '.join(PSRBENCH_SUBSETS)}"
            )
        wanted = tuple(dict.fromkeys(names[s.lower()] for s in asked))
    files = {subset: src / f"{subset}.json" for subset in wanted}
    present = {subset: path for subset, path in files.items() if path.is_file()}
    if not present:
        raise FileNotFoundError(
            f"psrbench: no subset file in {src}; expected {', '.join(p.name for p in files.values())} (with the "
            f"subjects/ and animals/ image folders) as unpacked from the PSRBench download"
        )
    if subsets is not None and len(present) < len(files):
        missing = [path.name for subset, path in files.items() if subset not in present]
        raise FileNotFoundError(f"psrbench: {', '.join(missing)} asked for but missing in {src}")
    # every file is parsed before the first identity is yielded: a broken file stops the run before any shard is written
    samples = {subset: _psrbench_samples(path) for subset, path in present.items()}
    for subset, items in samples.items():
        for index, sample in enumerate(items):
            yield _psrbench_record(src, present[subset], subset, index, sample)


def _psrbench_samples(path: Path) -> list:
    try:
        samples = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"psrbench: {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(samples, list):
        raise ValueError(
            f"psrbench: {path} holds a JSON {type(samples).__name__}; PSRBench files are a list of samples"
        )
    return samples


def _psrbench_record(src: Path, path: Path, subset: str, index: int, sample) -> Item:
    where = f"{path}#{index}"
    if not isinstance(sample, dict):
        return Skip(where, f"sample is a JSON {type(sample).__name__}, not an object")
    prompt = sample.get("instruction")
    if not isinstance(prompt, str) or not prompt.strip():
        return Skip(where, "sample has no prompt ('instruction')")
    key = "input_path" if "input_path" in sample else "input_paths"
    paths = sample.get(key)
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        return Skip(where, "sample has no reference image paths ('input_path')")
    numbers = sorted(int(m.group(1)) for k in sample if (m := re.fullmatch(r"category([1-9][0-9]*)", k)))
    if numbers != list(range(1, len(numbers) + 1)):
        return Skip(where, f"category keys are not category1..categoryN: {[f'category{n}' for n in numbers]}")
    subjects = [sample[f"category{n}"] for n in numbers]
    if not all(isinstance(word, str) and word.strip() for word in subjects):
        return Skip(where, f"a category word is empty or not a string: {subjects!r}")
    subjects = [word.strip() for word in subjects]
    if len(subjects) != len(paths):
        return Skip(where, f"{len(subjects)} category word(s) for {len(paths)} reference image(s)")
    references, masks = [], []
    for k, name in enumerate(paths):
        image_path = src / name
        if not image_path.is_file():
            return Skip(where, f"reference {k + 1} {name} is missing ({image_path})")
        alpha: list[Image.Image] = []
        image = _open_image(image_path, "RGB", where, alpha)
        if isinstance(image, Skip):
            return Skip(where, f"reference {k + 1} {name}: {image.reason}")
        references.append(image)
        masks.append(alpha[0] if alpha else None)
    extra = {"subjects": subjects, "subset": subset, "index": index, "reference_paths": list(paths)}
    if subset == "Position":
        relation = _relation(prompt)
        if relation is not None:
            extra["relation"] = relation
    consumed = {"instruction", "input_path", "input_paths", "result_path", *(f"category{n}" for n in numbers)}
    fields = {k: v for k, v in sample.items() if k not in consumed}
    if fields:
        extra["fields"] = fields
    return IdentityRecord(
        _identity_id(f"{subset.lower()}/{index:03d}"),
        references,
        [prompt.strip()],
        masks,
        source="psrbench",
        category=subset.lower(),
        extra=extra,
    )


def _relation(prompt: str) -> str | None:
    """The first spatial phrase of :data:`PSRBENCH_RELATIONS` in ``prompt`` (whole words, any case), or ``None``."""
    found = [
        (m.start(), -len(phrase), phrase)
        for phrase in PSRBENCH_RELATIONS
        if (m := re.search(rf"\b{re.escape(phrase)}\b", prompt, flags=re.I))
    ]
    return min(found)[2] if found else None


SOURCES = ("syncd", "dreambench", "dreambooth", "psrbench", "synthetic")


class Precompute:
    """Attach the conditioning ``policy`` precomputes for a record (``cond.pth``, see :mod:`divrl.data.schema`).

    The payload is the policy's business: ``policy.precompute(record, resolution)`` returns a dict (for a FLUX
    Kontext policy, the embeddings of every prompt and the reference latents at ``resolution``², with the model's
    name) that only that model family's encoder reads back. Applied after resizing, to exactly the references the
    shard stores, so training without the encoders sees what it would have computed itself.

    Args:
        policy: the policy whose encoders compute the payload (it implements ``precompute``).
        resolution: the training resolution the payload is computed at.
    """

    def __init__(self, policy, resolution: int):
        self.policy, self.resolution = policy, resolution

    def __call__(self, record: IdentityRecord) -> IdentityRecord:
        """Set ``record.conditioning`` to the policy's payload for it; returns the record.

        Raises:
            TypeError: the policy returned something other than a dict (``cond.pth`` must hold a dict).
        """
        conditioning = self.policy.precompute(record, self.resolution)
        if not isinstance(conditioning, dict):
            raise TypeError(
                f"{type(self.policy).__name__}.precompute returned a {type(conditioning).__name__} for identity "
                f"{record.id!r}; it must return a dict (what cond.pth stores)"
            )
        record.conditioning = conditioning
        return record


# ---------------------------------------------------------------------------------------------------- conversion


def convert(
    items: Iterable[Item],
    out_dir: str | os.PathLike,
    *,
    resolution: int | None = 512,
    resize: str = "pad",
    shard_size: int = 100,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_identities: int | None = None,
    name: str = "",
    precompute: Callable[[IdentityRecord], IdentityRecord] | None = None,
) -> ConversionReport:
    """Write ``items`` as ``<out_dir>/train-*.tar`` (and ``val-*.tar``); skipped and duplicate items are reported.

    Identities go to ``val`` by :func:`split_of` (a hash of the id and ``seed``), so the split does not depend on the
    order, the number of identities converted, or the machine. Shards are written to ``.partial`` names and renamed
    when complete: an interrupted run leaves only complete shards (and no ``.partial`` file). ``precompute`` (e.g.
    :class:`Precompute`) runs on each resized record.
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    report = ConversionReport()
    seen: set[str] = set()
    splits: dict[str, list[IdentityRecord]] = {"train": [], "val": []}

    def kept() -> Iterator[tuple[str, IdentityRecord]]:
        count = 0
        for item in items:
            if max_identities is not None and count >= max_identities:
                return
            if isinstance(item, Skip):
                report.skipped.append(item)
                continue
            try:
                check_identity_id(item.id)
            except ValueError as err:
                report.skipped.append(Skip(item.id, str(err)))
                continue
            if item.id in seen:
                report.skipped.append(Skip(item.id, "duplicate identity id (the first one was kept)"))
                continue
            seen.add(item.id)
            count += 1
            record = resize_record(item, resolution, resize)
            yield split_of(item.id, val_fraction, seed), precompute(record) if precompute is not None else record

    out = Path(out_dir)
    for split, record in kept():
        splits[split].append(record)
        report.converted[split] += 1
        if len(splits[split]) == shard_size:
            report.shards += _flush(splits[split], out, split, name, report)
    for split in ("train", "val"):
        if splits[split]:
            report.shards += _flush(splits[split], out, split, name, report)
    return report


def _flush(records: list[IdentityRecord], out: Path, split: str, name: str, report: ConversionReport) -> list[Path]:
    index = sum(1 for p in report.shards if p.name.startswith(f"{split}-"))
    prefix = f"{split}-{name}" if name else split
    paths = write_shards(list(records), out, shard_size=len(records), name=prefix, start=index)
    records.clear()
    return paths


# ---------------------------------------------------------------------------------------------------- --out's files

_STALE_PARTIAL = re.compile(r"^(train|val)-[0-9]{6,}\.tar\.partial$")
_SAMPLE_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of <key>.<entry>


def is_stale_partial(path: Path) -> bool:
    """Whether ``path`` is a shard :func:`convert` left half-written (``train-000000.tar.partial``, ...: the name
    of one of its shards with ``.partial`` appended, killed before the rename); any other file is the user's."""
    return bool(_STALE_PARTIAL.match(path.name)) and path.is_file()


def shard_error(path: Path, members: int = 1000) -> str | None:
    """Why ``path`` is not a divrl identity shard, in words (``None`` when it is one): a tar archive whose first
    sample, read from its first ``members`` members at most, holds the required ``<key>.json`` and ``<key>.ref.png``
    (:meth:`IdentityRecord.to_sample`, under a key :func:`check_identity_id` accepts). Reads headers only."""
    import tarfile

    if not path.is_file():
        return "it is not a file"
    try:
        with tarfile.open(path, "r:") as archive:
            key, entries = None, set()
            for _, member in zip(range(members), archive):
                match = _SAMPLE_MEMBER.match(member.name)
                if not member.isfile() or not match:
                    return f"its member {member.name!r} is not a <key>.<entry> file of a webdataset sample"
                if key is not None and match.group(1) != key:
                    break
                key = match.group(1)
                entries.add(match.group(2))
    except tarfile.TarError:
        return "it is not a tar archive"
    except OSError as err:
        return f"it cannot be read: {err.strerror or err}"
    if key is None:
        return "it is an empty tar archive"
    try:
        check_identity_id(key)
    except ValueError:
        return f"its first sample's key {key!r} is not a divrl identity id"
    if not {"json", "ref.png"} <= entries:
        return f"its first sample {key!r} lacks {key}.json or {key}.ref.png, which every divrl sample holds"
    return None

"""The evaluation run: conditions → samples (generated or read from disk) → per-sample scores → reports.

Plain Python + torch; ``divrl evaluate`` (:meth:`divrl.training.DivRLTrainer.evaluate`) supplies the generator
function of the policy. Everything is written under ``output_dir``::

    <method>/images/<id>/<prompt index>_<k>.png     generated samples (reused when present: the run resumes)
    <method>/generation.json                        how they were generated (a mismatch stops the run)
    <method>/scores.jsonl                           one line per sample, appended as groups are scored; its
                                                    ``file``: relative to <method>/ for generated images (the folder
                                                    may move), the path as read for ``samples_dir`` ones
    <method>/grid.png                               reference + samples of the first conditions
    metrics.json, table.md, frontier.png            every method, overall and per category

A killed run restarts where it stopped: finished images are not generated again and scored samples are not scored
again. Changing the generation settings of a method (its LoRA, steps, seeds, resolution) under the same
``output_dir`` is refused instead of mixing two methods' images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import Tensor

from divrl.data.stream import (
    ConditionSample,
    SkipCounter,
    read_identities,
    to_condition,
)
from divrl.eval.metrics import summarize
from divrl.eval.report import method_grid, plot_frontier, write_table
from divrl.eval.suite import EvalSuite
from divrl.images import to_image_batch, to_pil

__all__ = ["EvalCondition", "Evaluation", "data_conditions", "method_name", "samples_layout"]

log = logging.getLogger(__name__)


@dataclass
class EvalCondition:
    """One (identity, prompt) cell of the evaluation; ``prompt_index`` numbers the identity's prompts."""

    id: str
    prompt_index: int
    prompt: str
    reference: Image.Image
    mask: Image.Image | None = None
    category: str | None = None
    conditioning: dict | None = None
    files: list[Path] | None = None  # samples another method generated (``samples_layout``)
    references: list[Image.Image] | None = None  # all the identity's references (the first is ``reference``)
    masks: list[Image.Image | None] | None = None  # their masks (the first is ``mask``); with ``references``
    metadata: dict = field(default_factory=dict)  # the identity's further JSON fields (``ConditionSample.metadata``)

    @property
    def key(self) -> str:
        return f"{self.id}/{self.prompt_index:03d}"

    def seed(self, base: int) -> int:
        """A seed that depends on the condition, not on its position in the list (subsets and resumes agree)."""
        digest = hashlib.sha256(f"{base}/{self.key}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % (2**63 - 1)

    def as_sample(self) -> ConditionSample:
        references, masks = (self.references, self.masks) if self.references else ([self.reference], [self.mask])
        return ConditionSample(
            self.id,
            self.prompt,
            references,
            masks,
            self.category,
            dict(self.metadata),
            self.conditioning,
            self.prompt_index,
        )


def data_conditions(
    shards: Sequence[str], num_identities: int | None = None, prompts_per_identity: int | None = None
) -> list[EvalCondition]:
    """Every (identity, prompt) of the shards, in shard order: the first ``num_identities`` identities (all when
    ``None``), each with its first ``prompts_per_identity`` prompts (all when ``None``). Bad samples are skipped and
    counted in the log, as in training."""
    skips = SkipCounter(1000)
    out = []
    for n, record in enumerate(read_identities(list(shards), skips)):
        if num_identities is not None and n >= num_identities:
            break
        for index in range(len(record.prompts[:prompts_per_identity])):
            sample = to_condition(record, index)
            out.append(
                EvalCondition(
                    record.id,
                    index,
                    sample.prompt,
                    sample.reference,
                    sample.mask,
                    sample.category,
                    sample.conditioning,
                    references=sample.references,
                    masks=sample.masks,
                    metadata=sample.metadata,
                )
            )
    if skips.count:
        log.warning("evaluation data: %d bad sample(s) skipped: %s", skips.count, "; ".join(skips.reasons[:5]))
    if not out:
        raise ValueError(f"no evaluation conditions in {list(shards)}: the shards hold no readable identity")
    return out


def samples_layout(root: str | Path, method: str, categories: dict[str, str] | None = None) -> list[EvalCondition]:
    """Samples another system generated, in the DreamBench++ layout
    ``<root>/<method>/{src_image,text,tgt_image}/<id>/<prompt index>_<k>.<ext>``.

    Every ``tgt_image`` file is a sample; its reference is the ``src_image`` file of the same name and its prompt the
    first line of ``text/<id>/<prompt index>_<k>.txt``. ``categories`` maps ids to categories (taken from the data
    when its identities share the ids).

    Raises:
        FileNotFoundError: when the method's ``tgt_image`` folder is missing, or a sample has no reference or text.
    """
    base = Path(root) / method
    targets = base / "tgt_image"
    if not targets.is_dir():
        raise FileNotFoundError(
            f"samples_dir: {targets} does not exist; expected the DreamBench++ layout "
            f"<samples_dir>/<method>/{{src_image,text,tgt_image}}/<id>/<prompt>_<k>.jpg"
        )
    groups: dict[tuple[str, int], list[Path]] = {}
    for path in sorted(targets.glob("*/*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        prompt_index = _prompt_index(path)
        groups.setdefault((path.parent.name, prompt_index), []).append(path)
    out = []
    for (identity, prompt_index), files in sorted(groups.items()):
        first = files[0]
        source = _sibling(base / "src_image" / identity, first.stem, (".jpg", ".jpeg", ".png"))
        text = _sibling(base / "text" / identity, first.stem, (".txt",))
        prompt = text.read_text().strip().splitlines()[0]
        with Image.open(source) as im:
            reference = im.convert("RGB")
        category = (categories or {}).get(identity)
        out.append(EvalCondition(identity, prompt_index, prompt, reference, None, category, files=files))
    if not out:
        raise FileNotFoundError(f"samples_dir: no images under {targets}/<id>/")
    return out


def _prompt_index(path: Path) -> int:
    head = path.stem.split("_")[0]
    if not head.isdigit():
        raise ValueError(f"samples_dir: {path} is not named <prompt index>_<k>.<ext>")
    return int(head)


def _sibling(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path:
    for name in (stem, stem.split("_")[0]):
        for suffix in suffixes:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    raise FileNotFoundError(f"samples_dir: no {'/'.join(suffixes)} file for sample {stem!r} in {folder}")


REPORTS = ("metrics.json", "table.md", "frontier.png")
"""The files :meth:`Evaluation.write_reports` writes beside the methods' folders."""


def method_name(name, flag: str = "method") -> str:
    """``name`` if it is one plain folder name (the method's images and scores go to ``<output_dir>/<name>/``): no
    ``/`` or ``\\``, not empty, ``.`` or ``..``, not one of the report files; anything else is refused before a file is
    written (``/tmp/x`` or ``../x`` would write and move files outside ``output_dir``)."""
    text = name if isinstance(name, str) else ""
    if text in REPORTS:
        raise ValueError(
            f"{flag} name {name!r} is the name of a report file written to <output_dir>/; name the method "
            f"otherwise, e.g. {text.split('.')[0] + '_method'!r}"
        )
    if not text.strip() or any(c in text for c in "/\\\0") or text in (".", ".."):
        parts = [p for p in re.split(r"[/\\\0]+", str(name)) if p.strip() and p not in (".", "..")]
        raise ValueError(
            f"{flag} name {name!r} is not a plain folder name (the method's images and scores are written "
            f"to <output_dir>/<name>/): use a name without '/', '\\' or '..', e.g. "
            f"{parts[-1] if parts else 'mine'!r}"
        )
    return text


Generator = Callable[[EvalCondition, int, int], Tensor]
"""``generate(condition, num_samples, seed) -> (num_samples, 3, H, W)`` images in [0, 1]."""


class Evaluation:
    """Runs methods through one :class:`~divrl.eval.suite.EvalSuite` and writes the reports.

    Args:
        suite: the metrics.
        output_dir: where everything goes (see the module docstring).
        num_samples: samples per condition for generated methods (for read methods: what the folder holds).
        seed: base seed of the generated samples' initial noise (every method gets the same noise per condition).
        grid_conditions: identities shown in each method's ``grid.png`` (their first prompt).
        progress: show a progress bar.
    """

    def __init__(
        self,
        suite: EvalSuite,
        output_dir: str | Path,
        num_samples: int = 4,
        seed: int = 0,
        grid_conditions: int = 4,
        progress: bool = True,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if grid_conditions < 0:
            raise ValueError(f"grid_conditions must be >= 0 (0: no grid.png), got {grid_conditions}")
        self.suite = suite
        self.output_dir = Path(output_dir)
        self.num_samples = num_samples
        self.seed = seed
        self.grid_conditions = grid_conditions
        self.progress = progress
        self.results: dict[str, dict] = {}

    def run_method(
        self,
        name: str,
        conditions: Sequence[EvalCondition],
        generate: Generator | None = None,
        meta: dict | None = None,
    ) -> dict:
        """Generate (or read) and score ``conditions`` for method ``name``; returns its summary.

        Args:
            name: the method's name (folder name, table row, plot label).
            conditions: what to evaluate.
            generate: the generator function; ``None`` reads each condition's ``files``.
            meta: generation settings recorded in ``generation.json`` and compared on a resumed run.
        """
        folder = self.output_dir / method_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        self._check_meta(
            folder,
            {"method": name, "num_samples": self.num_samples, "seed": self.seed, **(meta or {})},
            generated=generate is not None,
        )
        scored = self._previous_scores(folder)
        rows: list[dict] = []
        grid_groups = []
        _end_line(folder / "scores.jsonl")
        with (folder / "scores.jsonl").open("a") as scores_file:
            for condition in _progress(conditions, f"evaluate {name}", self.progress):
                images, files = self._images(folder, condition, generate)
                keys = [f"{condition.key}/{k}" for k in range(len(files))]
                if all(
                    key in scored and _same_sample(scored[key], condition, files[k], folder)
                    for k, key in enumerate(keys)
                ):
                    group = [scored[key] for key in keys]
                else:
                    values = self.suite.score_group(
                        condition.reference,
                        images(),
                        condition.prompt,
                        condition.mask,
                        condition.category,
                        sample=condition.as_sample(),
                    )
                    group = []
                    for k, key in enumerate(keys):
                        row = {
                            "key": key,
                            "id": condition.id,
                            "prompt": condition.prompt,
                            "category": condition.category,
                            "file": _stored(files[k], folder),
                            **{c: values[c][k] for c in values},
                        }
                        scores_file.write(json.dumps(row) + "\n")
                        group.append(row)
                    scores_file.flush()
                rows.extend(group)
                if len(grid_groups) < self.grid_conditions and condition.id not in {g[0].id for g in grid_groups}:
                    grid_groups.append((condition, images(), group))  # one prompt of each of the first identities
        if grid_groups:
            method_grid(name, grid_groups, self.suite).save(folder / "grid.png")
        summary = summarize(
            rows,
            self.suite.columns,
            identity=self.suite.consistency_metric,
            diversity=self.suite.diversity_metric,
            threshold=self.suite.consistency_threshold,
        )
        self.results[name] = summary
        return summary

    def write_reports(self) -> dict:
        """``metrics.json``, ``table.md`` and ``frontier.png`` for every method run so far; returns the metrics."""
        metrics = {
            "protocol": {
                "num_samples": self.num_samples,
                "seed": self.seed,
                "columns": self.suite.columns,
                "models": self.suite.describe(),
                "consistency_metric": self.suite.consistency_metric,
                "consistency_threshold": self.suite.consistency_threshold,
                "diversity_metric": self.suite.diversity_metric,
                "identity_skip_categories": sorted(self.suite.identity_skip_categories),
            },
            "methods": self.results,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_table(metrics, self.suite, self.output_dir / "table.md")
        plot_frontier(metrics, self.output_dir / "frontier.png")
        return metrics

    def _previous_scores(self, folder: Path) -> dict[str, dict]:
        """Scores of an earlier run, if the same models computed them; otherwise they are set aside and rescored."""
        path, stamp = folder / "scores.jsonl", folder / "scoring.json"
        scoring = json.loads(
            json.dumps(
                {
                    "models": self.suite.describe(),
                    "consistency": self.suite.consistency_metric,
                    "skip": sorted(self.suite.identity_skip_categories),
                }
            )
        )
        if path.is_file() and (not stamp.is_file() or json.loads(stamp.read_text()) != scoring):
            stale = path.with_suffix(".jsonl.stale")
            path.replace(stale)
            log.warning("%s: scored by other models or settings; moved to %s and scoring again", path, stale.name)
        stamp.write_text(json.dumps(scoring, indent=2))
        return _read_scores(path, self.suite.columns)

    def _images(self, folder: Path, condition: EvalCondition, generate: Generator | None):
        """The condition's images as a lazy loader (scored groups need no pixels) and their files."""
        if generate is None:
            files = list(condition.files or [])
            return (lambda: _load(files)), files
        group = folder / "images" / condition.id
        files = [group / f"{condition.prompt_index:03d}_{k}.png" for k in range(self.num_samples)]
        if not all(f.is_file() for f in files):
            images = generate(condition, self.num_samples, condition.seed(self.seed)).float().cpu()
            group.mkdir(parents=True, exist_ok=True)
            for image, path in zip(images, files, strict=True):
                partial = path.with_suffix(".partial.png")
                to_pil(image).save(partial)
                partial.replace(path)  # a killed run never leaves a truncated image behind
        return (lambda: _load(files)), files

    def _check_meta(self, folder: Path, meta: dict, generated: bool) -> None:
        path = folder / "generation.json"
        meta = json.loads(json.dumps(meta))  # normalise (tuples → lists) for the comparison
        if path.is_file():
            old = json.loads(path.read_text())
            changed = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            if changed:
                what = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
                raise ValueError(
                    f"{folder} holds method {meta['method']!r} generated with other settings ({what}); its images would "
                    f"be mixed with new ones. Use another --output_dir, another method name, or delete {folder}"
                )
        path.write_text(json.dumps({**meta, "generated": generated}, indent=2))


def _stored(file: Path, folder: Path) -> str:
    """A sample's ``file`` in ``scores.jsonl``: relative to the method's folder when it lies in it (generated images),
    else as read (``samples_dir``)."""
    return file.relative_to(folder).as_posix() if file.is_relative_to(folder) else str(file)


def _same_sample(row: dict, condition: EvalCondition, file: Path, folder: Path) -> bool:
    """Whether a scored row is this condition's sample (same prompt, category and file; a ``file`` written before it
    was stored relative to the method's folder counts when it is the same path)."""
    return (
        row["prompt"] == condition.prompt
        and row["category"] == condition.category
        and row["file"] in (_stored(file, folder), str(file))
    )


def _end_line(path: Path) -> None:
    """Start a new line after a last line a killed run cut short, so that the next row is not glued onto it."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _read_scores(path: Path, columns: Sequence[str]) -> dict[str, dict]:
    """Scored samples of a previous run; rows lacking a configured column (the suite changed) are scored again."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run may be cut short
        if all(column in row for column in columns):
            out[row["key"]] = row
    return out


def _load(files: Sequence[Path]) -> Tensor:
    return to_image_batch([str(f) for f in files])


def _progress(items: Sequence, desc: str, enabled: bool) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit="cond"))

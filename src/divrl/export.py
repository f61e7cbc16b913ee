"""Hub-ready exports of a trained run: the LoRA file(s), a model card and the training config in one folder.

``divrl export RUN_OR_LORA --out DIR`` (:mod:`divrl.cli_export`) writes::

    DIR/
      README.md                          the model card: YAML front matter the Hub reads, then the body
      pytorch_lora_weights.safetensors   the final LoRA (diffusers format: ``pipe.load_lora_weights(DIR)``)
      stage1/pytorch_lora_weights.safetensors   the end of stage 1, when the run has it
      training_config.yaml               the run's resolved configuration (``divrl fit --print_config``'s)
      divrl_info.json                    step, stage and base model of the weights, as the run wrote them
      images/                            references, samples, their grid, the evaluation's frontier plot

The card's body says what DivRL is, the training recipe read from the config, the evaluation table of a
``divrl evaluate`` folder when one is given, a sample grid, and a diffusers snippet that reproduces the first sample
(:meth:`divrl.policy.PolicyConfig.pipeline_call` gives the family's pipeline arguments). This module builds the folder
and the card; the samples come from ``divrl sample`` (:mod:`divrl.cli_export` runs it) and the upload from
``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import yaml

from divrl.model_card import base_license, model_card, policy_config, reference_file

__all__ = [
    "LORA_FILE",
    "ExportError",
    "RunFiles",
    "Samples",
    "find_run",
    "read_samples",
    "sampling_config",
    "write_export",
    "push_to_hub",
]

LORA_FILE = "pytorch_lora_weights.safetensors"

SAMPLE_KEYS = ("seed_everything", "trainer", "model", "data")
"""The top-level keys of a saved ``divrl fit`` configuration that ``divrl sample`` takes; the others (``ckpt_path``,
``weights_only`` and Lightning's own ``optimizer`` / ``lr_scheduler``, unused: divrl's is ``model.optimizer``) are
``fit``'s."""


class ExportError(ValueError):
    """An export input divrl cannot use; the message names it and the fix."""


@dataclass
class RunFiles:
    """What an export is made of: the weights' folders and the run's configuration.

    Attributes:
        lora: the folder of the weights to publish (``pytorch_lora_weights.safetensors`` and ``info.json``).
        stages: earlier stages' folders by name (``{"stage1": Path}``), published beside the final weights.
        info: the weights' ``info.json`` (step, stage, base model), ``{}`` when it is missing.
        config_path: the run's ``config.yaml``, or ``None`` when none was found.
        config: ``config_path`` parsed, or ``{}``.
    """

    lora: Path
    stages: dict[str, Path] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    config_path: Path | None = None
    config: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One condition of a ``divrl sample`` folder: its references, prompt, images, grid and the seed of its noise."""

    id: str
    prompt: str
    files: list[Path]
    references: list[Path]
    grid: Path | None
    seed: int


@dataclass
class Samples:
    """A ``divrl sample`` output folder: its settings (``samples.json``) and its conditions."""

    folder: Path
    num_steps: int
    noise_level: float
    items: list[Sample]


def find_run(path: str | os.PathLike, config: str | os.PathLike | None = None) -> RunFiles:
    """The weights and configuration of ``path``: a run folder (its ``lora/final``, and ``lora/stage<k>`` beside it)
    or a LoRA folder written by :class:`~divrl.training.LoRAExporter` (its run's ``config.yaml`` two levels up).
    ``config`` overrides the configuration found."""
    root = Path(path)
    if not root.exists():
        raise ExportError(
            f"{root} does not exist; pass a run folder (runs/demo) or a LoRA folder (runs/demo/lora/final)"
        )
    if root.is_file():
        if root.suffix == ".ckpt":
            raise ExportError(
                f"{root} is a training checkpoint; export the LoRA folder the run wrote (<run>/lora/final), or the run "
                f"folder itself"
            )
        raise ExportError(f"{root} is a file; pass a run folder (runs/demo) or a LoRA folder (runs/demo/lora/final)")
    if (root / LORA_FILE).is_file():
        lora, run = root, (root.parent.parent if root.parent.name == "lora" else None)
    elif (root / "lora" / "final" / LORA_FILE).is_file():
        lora, run = root / "lora" / "final", root
    elif (root / "transformer").is_dir() or (root / "lora" / "final" / "transformer").is_dir():
        raise ExportError(
            f"{root} holds fully fine-tuned weights (transformer/), not a LoRA; divrl export publishes LoRAs: upload the "
            f"transformer/ folder with `hf upload` and load it with the pipeline's transformer class"
        )
    else:
        stages = sorted(p.name for p in (root / "lora").glob("stage*") if (p / LORA_FILE).is_file())
        hint = f" (it has {', '.join(stages)}: pass {root / 'lora' / stages[-1]})" if stages else ""
        raise ExportError(
            f"{root} has no {LORA_FILE} and no lora/final/{LORA_FILE}{hint}; pass a finished run's folder or a LoRA "
            f"folder written by divrl fit"
        )
    stages = {}
    if lora.parent.name == "lora":
        stages = {
            p.name: p
            for p in sorted(lora.parent.glob("stage*"))
            if p != lora and (p / LORA_FILE).is_file() and p.name[5:].isdigit()
        }
    info_file = lora / "info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    config_path = Path(config) if config is not None else (_run_config(run) if run is not None else None)
    if config is not None and not config_path.is_file():
        raise ExportError(f"--config {config_path} is not a file; pass the run's config.yaml")
    if config_path is not None and not config_path.is_file():
        config_path = None
    parsed = {}
    if config_path is not None:
        try:
            parsed = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ExportError(
                f"{config_path} is not valid YAML ({err}); pass the run's config.yaml with --config"
            ) from None
        if not isinstance(parsed, dict):
            raise ExportError(f"{config_path} is not a divrl configuration (a mapping); pass the run's config.yaml")
    return RunFiles(lora=lora, stages=stages, info=info, config_path=config_path, config=parsed)


def _run_config(run: Path) -> Path | None:
    """A run's saved configuration: ``<run>/config.yaml`` (no logger), else its newest logger version's."""
    if (run / "config.yaml").is_file():
        return run / "config.yaml"
    versions = [p for p in run.glob("*/version_*/config.yaml") if p.parent.name[8:].isdigit()]
    return max(versions, key=lambda p: int(p.parent.name[8:]), default=None)


def read_samples(folder: str | os.PathLike) -> Samples:
    """A ``divrl sample`` output folder (its ``samples.json``, images, references and grids)."""
    from divrl.utils import mix_seeds

    folder = Path(folder)
    meta_file = folder / "samples.json"
    if not meta_file.is_file():
        raise ExportError(f"--samples {folder} has no samples.json; pass the --output_dir of a `divrl sample` run")
    meta = json.loads(meta_file.read_text())
    if not meta.get("complete", False):
        raise ExportError(f"--samples {folder}: that `divrl sample` run stopped before it finished; run it again")
    items = []
    for index, record in enumerate(meta["samples"]):
        # as written (relative to where `divrl sample` ran), else in this folder (it was moved)
        files = [Path(f) if Path(f).exists() else folder / record["id"] / Path(f).name for f in record["files"]]
        references = [
            Path(f) if Path(f).exists() else folder / record["id"] / Path(f).name for f in record.get("references", [])
        ]
        grid = folder / record["id"] / f"{index:03d}_grid.png"
        items.append(
            Sample(
                id=record["id"],
                prompt=record["prompt"],
                files=files,
                references=references,
                grid=grid if grid.is_file() else None,
                seed=mix_seeds(int(meta["seed"]), index),
            )
        )
    return Samples(folder, int(meta["num_steps"]), float(meta["noise_level"]), items)


def sampling_config(config: dict, one_device: bool = False, where: str = "the run's config") -> dict:
    """``config`` (a saved ``divrl fit`` configuration) as ``divrl sample --config`` takes it: its
    :data:`SAMPLE_KEYS`; with ``one_device``, on one device of this machine without a logger (``divrl export``'s
    samples, ``divrl app``), refusing a GPU configuration on a machine without one."""
    import torch

    kept = {k: v for k, v in config.items() if k in SAMPLE_KEYS}
    if not one_device:
        return kept
    trainer = dict(kept.get("trainer") or {})
    if str(trainer.get("accelerator", "auto")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ExportError(
            f"{where} trains on GPUs and this machine has none; run it on a GPU node, or sample there with "
            f"`divrl sample` and pass that folder to `divrl export --samples` (--num-samples 0: no samples)"
        )
    kept["trainer"] = {**trainer, "devices": 1, "num_nodes": 1, "strategy": "auto", "logger": False}
    return kept


def _eval_section(eval_dir: Path, images: Path) -> tuple[list[str], list[Path]]:
    table = eval_dir / "table.md"
    if not table.is_file():
        raise ExportError(f"--eval {eval_dir} has no table.md; pass the --output_dir of a `divrl evaluate` run")
    lines = ["## Evaluation", "", f"`divrl evaluate` ({eval_dir.name}):", "", table.read_text().strip(), ""]
    copied = []
    if (eval_dir / "frontier.png").is_file():
        copied.append(images / "frontier.png")
        shutil.copyfile(eval_dir / "frontier.png", copied[-1])
        lines += ["![consistency against diversity](images/frontier.png)", ""]
    return lines, copied


def _stack(paths: list[Path], target: Path) -> None:
    from PIL import Image

    tiles = [Image.open(p).convert("RGB") for p in paths]
    width = max(t.width for t in tiles)
    canvas = Image.new("RGB", (width, sum(t.height for t in tiles)), "white")
    y = 0
    for tile in tiles:
        canvas.paste(tile, (0, y))
        y += tile.height
    canvas.save(target)


def write_export(
    run: RunFiles,
    out: str | os.PathLike,
    samples: Samples | None = None,
    eval_dir: str | os.PathLike | None = None,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the Hub-ready folder ``out`` (see the module's docstring) and return it."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.lora / LORA_FILE, out / LORA_FILE)
    for name, folder in run.stages.items():
        (out / name).mkdir(exist_ok=True)
        shutil.copyfile(folder / LORA_FILE, out / name / LORA_FILE)
    if run.info:
        (out / "divrl_info.json").write_text(json.dumps(run.info, indent=2))
    if run.config_path is not None:  # without fit's own keys, so `divrl sample --config` takes it too
        (out / "training_config.yaml").write_text(yaml.safe_dump(sampling_config(run.config), sort_keys=False))
    policy = policy_config(run.config)
    base = base_model or run.info.get("model") or policy.model
    license_fields = {"license": license} if license else base_license(base)
    if samples is not None:
        for i, item in enumerate(samples.items):
            if item.files:
                shutil.copyfile(item.files[0], images / f"sample_{i}.png")
            for j, reference in enumerate(item.references):
                shutil.copyfile(reference, images / reference_file(i, j))
        grids = [item.grid for item in samples.items if item.grid is not None]
        if grids:
            _stack(grids, images / "samples.png")
    eval_lines = _eval_section(Path(eval_dir), images)[0] if eval_dir is not None else []
    card = model_card(run, base, license_fields, samples, repo_id, out, eval_lines, policy)
    (out / "README.md").write_text(card)
    return out


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a request that did not reach the Hub: ``OSError`` and the HTTP client's transport errors
    (``huggingface_hub`` uses ``httpx``, or its fork ``httpx2`` in newer releases)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_to_hub(
    folder: Path, repo_id: str, private: bool = False, token: str | None = None, endpoint: str | None = None
):
    """Create ``repo_id`` (if it is new) and upload ``folder`` to it with ``huggingface_hub``; returns the commit's
    URL. Offline or unauthenticated, raises :class:`ExportError` with one sentence (the folder stays)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="divrl export")
    except OfflineModeIsEnabled:
        raise ExportError(
            f"--push-to-hub {repo_id}: the Hub client is offline (HF_HUB_OFFLINE is set); {folder} is ready: upload it "
            f"later with `hf upload {repo_id} {folder}`"
        ) from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            why = (
                "is not authenticated (run `hf auth login` or set HF_TOKEN)" if status == 401 else "may not write there"
            )
            raise ExportError(
                f"--push-to-hub {repo_id}: the Hub refused the upload: this account {why}; {folder} is ready"
            ) from None
        raise ExportError(f"--push-to-hub {repo_id}: the Hub answered {status} ({err}); {folder} is ready") from None
    except _transport_errors() as err:  # no network: connection refused, name resolution, timeouts
        raise ExportError(
            f"--push-to-hub {repo_id}: cannot reach the Hub ({type(err).__name__}: {err}); {folder} is ready: upload it "
            f"later with `hf upload {repo_id} {folder}`"
        ) from None
    return str(getattr(info, "commit_url", info))

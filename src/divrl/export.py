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
from dataclasses import dataclass, field, fields
from importlib import import_module
from pathlib import Path

import yaml

__all__ = [
    "LORA_FILE",
    "ExportError",
    "RunFiles",
    "Samples",
    "find_run",
    "read_samples",
    "sampling_config",
    "policy_config",
    "base_license",
    "model_card",
    "write_export",
    "push_to_hub",
]

LORA_FILE = "pytorch_lora_weights.safetensors"

SAMPLE_KEYS = ("seed_everything", "trainer", "model", "data")
"""The top-level keys of a saved ``divrl fit`` configuration that ``divrl sample`` takes; the others (``ckpt_path``,
``weights_only`` and Lightning's own ``optimizer`` / ``lr_scheduler``, unused: divrl's is ``model.optimizer``) are
``fit``'s."""

DIVRL_SUMMARY = (
    "DivRL (arXiv 2606.23950) post-trains a subject-driven generator with Flow-GRPO so that it keeps the subject's "
    "identity without copying the reference photo's pose and layout. It rewards structural diversity (nSSM: "
    "1 − correlation of the reference's and the sample's feature self-similarity) and, in a second stage, penalises "
    "samples whose identity match (VSM) falls below a gate (*Explore-and-Suppress*)."
)

KNOWN_LICENSES: dict[str, dict[str, str]] = {
    "black-forest-labs/flux.1-kontext-dev": {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md",
    },
    "black-forest-labs/flux.2-klein-4b": {"license": "apache-2.0"},
    "black-forest-labs/flux.2-klein-base-4b": {"license": "apache-2.0"},
    "qwen/qwen-image-edit-2509": {"license": "apache-2.0"},
    "qwen/qwen-image-edit-2511": {"license": "apache-2.0"},
}
"""Licences of the published bases divrl trains, as their Hub cards state them: used when the base's own card (a
local folder's or the Hub cache's ``README.md``) cannot be read."""


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


def _model(config: dict) -> dict:
    return config.get("model") or {}


def _class_and_args(entry) -> tuple[str, dict]:
    if isinstance(entry, dict) and "class_path" in entry:
        return entry["class_path"], dict(entry.get("init_args") or {})
    return "", dict(entry or {}) if isinstance(entry, dict) else {}


def policy_config(config: dict):
    """The run's :class:`~divrl.policy.PolicyConfig` (its family's subclass), built from ``model.policy``."""
    from divrl.policy import KontextConfig

    class_path, args = _class_and_args(_model(config).get("policy"))
    cls = KontextConfig
    if class_path:
        module, _, name = class_path.rpartition(".")
        cls = getattr(import_module(module), name)
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in args.items() if k in known and k != "lora"}, lora=None)


def base_license(model: str) -> dict[str, str]:
    """The base model's licence fields for the card's front matter: from its own card (a local folder's, or the Hub
    cache's ``README.md``), else :data:`KNOWN_LICENSES`, else ``{}``. No network."""
    from huggingface_hub import ModelCard

    card_file: Path | None = Path(model) / "README.md" if Path(model).is_dir() else None
    if card_file is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "README.md")
            card_file = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a repo id: no cached card
            card_file = None
    if card_file is not None and card_file.is_file():
        data = ModelCard.load(card_file).data.to_dict()
        found = {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}
        if found:
            return found
    return dict(KNOWN_LICENSES.get(model.lower(), {}))


def _is_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not Path(model).exists() and not model.startswith((".", "~"))


def _recipe(config: dict, info: dict) -> list[tuple[str, str]]:
    """The training recipe, one (what, value) row each, read from the resolved configuration."""
    model = _model(config)
    rows: list[tuple[str, str]] = []
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    switch = next(
        (
            c.get("init_args", {}).get("switch_steps")
            for c in callbacks
            if str(c.get("class_path", "")).endswith("StageSwitch")
        ),
        None,
    )
    rewards = model.get("rewards") or ([model["reward"]] if model.get("reward") else [])
    names = []
    for entry in rewards:
        path, args = _class_and_args(entry)
        detail = ", ".join(f"{k} {args[k]}" for k in ("threshold", "weight") if k in args)
        names.append(f"`{path.rpartition('.')[2] or path}`" + (f" ({detail})" if detail else ""))
    max_steps = (config.get("trainer") or {}).get("max_steps")
    if names:
        stages = len(names)
        when = f"; stage 2 from update {switch}" if switch is not None and stages > 1 else ""
        rows.append(("rewards", f"{stages} stage(s): " + " → ".join(names) + when))
    objectives = model.get("objective")
    objectives = objectives if isinstance(objectives, list) else [objectives]
    objective_names = [
        (_class_and_args(o)[0].rpartition(".")[2] or "GRPOObjective") for o in objectives if o is not None
    ]
    rows.append(("objective", " → ".join(f"`{n}`" for n in objective_names) or "`GRPOObjective` (Flow-GRPO)"))
    if max_steps is not None:
        rows.append(("optimizer updates", str(max_steps)))
    if info.get("global_step") is not None:
        rows.append(("these weights", f"update {info['global_step']}, end of stage {info.get('stage', '?')}"))
    _, policy_args = _class_and_args(model.get("policy"))
    lora = policy_args.get("lora") or {}
    if lora:
        rows.append(("LoRA", f"rank {lora.get('rank')}, alpha {lora.get('alpha')}"))
    sampling = model.get("sampling") or {}
    if sampling:
        rows.append(
            (
                "rollouts",
                f"group size {sampling.get('group_size')}, {sampling.get('num_steps')} SDE steps at "
                f"{sampling.get('resolution')}², noise level {sampling.get('noise_level')}",
            )
        )
    optimizer = model.get("optimizer") or config.get("optimizer")
    if isinstance(optimizer, dict):
        path, args = _class_and_args(optimizer)
        rows.append(("optimizer", f"`{path.rpartition('.')[2]}`" + (f", lr {args['lr']}" if "lr" in args else "")))
    data = config.get("data") or {}
    if data.get("shards"):
        rows.append(
            ("data", f"`{data['shards']}`" + (f", batch size {data['batch_size']}" if "batch_size" in data else ""))
        )
    return rows


def snippet(
    pipeline: str,
    base: str,
    lora: str,
    call: dict,
    sample: Sample | None,
    reference: str | None,
    prepare: str | None = None,
) -> str:
    """The diffusers code that loads the base and the LoRA and samples ``sample``'s first image; ``prepare``: lines
    that turn ``reference`` into the pipeline's input (:meth:`~divrl.policy.PolicyConfig.pipeline_reference`)."""
    args = "".join(f"    {k}={v!r},\n" for k, v in call.items())
    load = f'load_image("{reference}")' if reference else 'load_image("subject.png")  # your subject photo'
    prompt = sample.prompt if sample is not None else "a photo of the subject on the beach"
    seed = sample.seed if sample is not None else 0
    return (
        "import torch\n"
        f"from diffusers import {pipeline}\n"
        "from diffusers.utils import load_image\n\n"
        'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
        'dtype = torch.bfloat16 if device == "cuda" else torch.float32\n'
        f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype=dtype).to(device)\n'
        f'pipe.load_lora_weights("{lora}")\n'
        f"reference = {load}\n"
        f"{prepare or ''}"
        "image = pipe(\n"
        "    image=reference,\n"
        f"    prompt={prompt!r},\n"
        f"{args}"
        f"    generator=torch.Generator().manual_seed({seed}),\n"
        ").images[0]\n"
        'image.save("sample.png")\n'
    )


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


def model_card(
    run: RunFiles,
    base: str,
    license_fields: dict[str, str],
    samples: Samples | None,
    repo_id: str | None,
    out: Path,
    eval_lines: list[str],
    policy=None,
) -> str:
    """The card's text: front matter (``huggingface_hub.ModelCardData``) and body."""
    from huggingface_hub import ModelCard, ModelCardData

    policy = policy if policy is not None else policy_config(run.config)
    first = samples.items[0] if samples is not None and samples.items else None
    widget = []
    if samples is not None:
        for i, item in enumerate(samples.items):
            if item.files:
                widget.append({"text": item.prompt, "output": {"url": f"images/sample_{i}.png"}})
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="diffusers",
        pipeline_tag="image-to-image",
        tags=["lora", "divrl", "diffusers", policy.family_tag, "subject-driven-generation"],
        widget=widget or None,
        **license_fields,
    )
    name = repo_id or out.name
    lines = [
        f"# {name}",
        "",
        f"A LoRA for [{base}]({'https://huggingface.co/' + base if _is_hub_id(base) else base}) "
        f"trained with divrl (DivRL).",
        "",
        DIVRL_SUMMARY,
        "",
    ]
    lines += ["## Training", "", "| | |", "| --- | --- |"]
    lines += [f"| {what} | {value} |" for what, value in _recipe(run.config, run.info)]
    lines += [
        "",
        "The resolved configuration is `training_config.yaml`"
        + (f"; the end of stage 1 is in `{'`, `'.join(f'{s}/' for s in run.stages)}`." if run.stages else "."),
        "",
    ]
    lines += eval_lines
    if samples is not None and samples.items:
        lines += [
            "## Samples",
            "",
            f"{len(samples.items)} conditions, {samples.num_steps} deterministic steps; reference "
            f"on the left, each sample captioned with its scores:",
            "",
            "![samples](images/samples.png)",
            "",
        ]
    lines += ["## Use it with diffusers", ""]
    where = repo_id or str(out)
    reference = None
    if first is not None and first.references:
        reference = (
            f"https://huggingface.co/{repo_id}/resolve/main/images/reference_0.png"
            if repo_id
            else str(out / "images" / "reference_0.png")
        )
    if first is not None and len(first.references) > 1:
        lines += [
            f"This model conditions on {len(first.references)} references; diffusers' "
            f"`{policy.diffusers_pipeline}` takes one, so sample it with `divrl sample` instead.",
            "",
        ]
    else:
        size = int((_model(run.config).get("sampling") or {}).get("resolution", 512))
        call = policy.pipeline_call(size, size, samples.num_steps if samples is not None else 28)
        prepare = policy.pipeline_reference(size, size)
        lines += [
            "```python",
            snippet(policy.diffusers_pipeline, base, where, call, first, reference, prepare).rstrip(),
            "```",
            "",
        ]
        differences = policy.pipeline_differences()
        if first is not None and not differences:
            lines += ["This reproduces the first sample above (`divrl sample`'s deterministic sampler, same seed).", ""]
        for difference in differences:
            lines += [f"- Not reproduced by the stock pipeline: {difference}; `divrl sample` samples as trained.", ""]
    lines += [
        "## With divrl",
        "",
        "```bash",
        f"divrl sample --config training_config.yaml --lora {where} "
        '--reference subject.png --prompts "[a photo of it on the beach]"',
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


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
                shutil.copyfile(reference, images / (f"reference_{i}.png" if j == 0 else f"reference_{i}_{j}.png"))
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

"""The model card of a ``divrl export`` folder: front matter for the Hub (``huggingface_hub.ModelCardData``), what
DivRL is, the training recipe read from the run's configuration, the evaluation, the samples and a diffusers snippet
that reproduces the first sample (:meth:`divrl.policy.PolicyConfig.pipeline_call`). Plain text building: the files
are :mod:`divrl.export`'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from importlib import import_module
from pathlib import Path

__all__ = ["DIVRL_SUMMARY", "policy_config", "base_license", "reference_file", "snippet", "model_card"]

DIVRL_SUMMARY = (
    "DivRL (arXiv 2606.23950) post-trains a subject-driven generator with Flow-GRPO so that it keeps the subject's "
    "identity without copying the reference photo's pose and layout. It rewards structural diversity (nSSM: "
    "1 − correlation of the reference's and the sample's feature self-similarity) and, in a second stage, penalises "
    "samples whose identity match (VSM) falls below a gate (*Explore-and-Suppress*)."
)


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
    cache's ``README.md``), else the registered families' :attr:`~divrl.policy.PolicyConfig.hub_licenses`, else ``{}``.
    No network."""
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
    from divrl.policy.loading import FAMILY_CONFIGS

    for _, class_path in FAMILY_CONFIGS.values():
        module, _, name = class_path.rpartition(".")
        known = getattr(import_module(module), name).hub_licenses.get(model.lower())
        if known:
            return dict(known)
    return {}


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


def reference_file(condition: int, reference: int) -> str:
    """The name ``divrl export`` gives a condition's reference photo under ``images/`` (the card's snippet loads it)."""
    return f"reference_{condition}.png" if reference == 0 else f"reference_{condition}_{reference}.png"


def snippet(
    pipeline: str,
    base: str,
    lora: str,
    call: dict,
    sample,
    references: Sequence[str] = (),
    prepare: str | None = None,
) -> str:
    """The diffusers code that loads the base and the LoRA and samples the first image of ``sample`` (a
    :class:`divrl.export.Sample`: its prompt and seed; ``None``: a placeholder) from ``references`` (paths or URLs;
    none: a placeholder; several: the pipeline's list of images); ``prepare``: lines that turn ``reference`` into the
    pipeline's input (:meth:`~divrl.policy.PolicyConfig.pipeline_reference`), applied to each."""
    args = "".join(f"    {k}={v!r},\n" for k, v in call.items())
    prompt = sample.prompt if sample is not None else "a photo of the subject on the beach"
    seed = sample.seed if sample is not None else 0
    if len(references) > 1:
        loads = ", ".join(f'load_image("{r}")' for r in references)
        if prepare:
            body = "".join(f"    {line}\n" for line in prepare.splitlines())
            reading = f"def as_divrl_reads(reference):\n{body}    return reference\n\n"
            reading += f"reference = [as_divrl_reads(r) for r in [{loads}]]\n"
        else:
            reading = f"reference = [{loads}]\n"
    else:
        load = f'load_image("{references[0]}")' if references else 'load_image("subject.png")  # your subject photo'
        reading = f"reference = {load}\n{prepare or ''}"
    return (
        "import torch\n"
        f"from diffusers import {pipeline}\n"
        "from diffusers.utils import load_image\n\n"
        'device = "cuda" if torch.cuda.is_available() else "cpu"\n'
        'dtype = torch.bfloat16 if device == "cuda" else torch.float32\n'
        f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype=dtype).to(device)\n'
        f'pipe.load_lora_weights("{lora}")\n'
        f"{reading}"
        "image = pipe(\n"
        "    image=reference,\n"
        f"    prompt={prompt!r},\n"
        f"{args}"
        f"    generator=torch.Generator().manual_seed({seed}),\n"
        ").images[0]\n"
        'image.save("sample.png")\n'
    )


def model_card(
    run,
    base: str,
    license_fields: dict[str, str],
    samples,
    repo_id: str | None,
    out: Path,
    eval_lines: list[str],
    policy=None,
) -> str:
    """The card's text: front matter (``huggingface_hub.ModelCardData``) and body, for ``run`` (a
    :class:`divrl.export.RunFiles`) and ``samples`` (a :class:`divrl.export.Samples`, or ``None``) written to
    ``out``."""
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
    references = []
    if first is not None:
        for j in range(len(first.references)):
            name = reference_file(0, j)
            references.append(
                f"https://huggingface.co/{repo_id}/resolve/main/images/{name}"
                if repo_id
                else str(out / "images" / name)
            )
    most = policy.pipeline_max_references
    if most is not None and len(references) > most:
        lines += [
            f"This model conditions on {len(references)} references; diffusers' "
            f"`{policy.diffusers_pipeline}` takes {'only one' if most == 1 else f'at most {most}'}, so sample it with "
            "`divrl sample` instead.",
            "",
        ]
    else:
        size = int((_model(run.config).get("sampling") or {}).get("resolution", 512))
        call = policy.pipeline_call(size, size, samples.num_steps if samples is not None else 28)
        prepare = policy.pipeline_reference(size, size)
        lines += [
            "```python",
            snippet(policy.diffusers_pipeline, base, where, call, first, references, prepare).rstrip(),
            "```",
            "",
        ]
        differences = policy.pipeline_differences(size, size)
        if first is not None and not differences:
            lines += [
                "This reproduces the first sample above (`divrl sample`'s deterministic sampler, same seed)"
                f"{policy.pipeline_match}.",
                "",
            ]
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

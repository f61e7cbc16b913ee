"""Loading a family's diffusers pipeline from the Hub or a local folder, with errors that say what to do: a folder
that is no pipeline, a file, a path that does not exist, a gated or unreachable Hub id, and a pipeline folder of
another model family (named with the ``model.policy.class_path`` that loads it). Each family's ``builder.py`` calls
:func:`load_family_pipeline` with its pipeline class."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from divrl.policy.base import ModelLoadError
from divrl.utils import parse_dtype

__all__ = [
    "FAMILY_CONFIGS",
    "FAMILY_NAMES",
    "family_config",
    "load_family_pipeline",
    "load_hint",
    "precompute_config",
    "register_family",
]

FAMILY_CONFIGS: dict[str, tuple[str, str]] = {}
"""diffusers pipeline class (``model_index.json``'s ``_class_name``) → the family and the ``model.policy.class_path``
that trains it; each family's package registers itself (:func:`register_family`) when ``divrl.policy`` is imported."""


FAMILY_NAMES: dict[str, str] = {}
"""A lower-case pattern of a family's Hub ids (``flux.1-kontext``) → its pipeline class: how :func:`family_config` knows an
id whose ``model_index.json`` is not in the local cache."""


def register_family(pipeline_class: str, family: str, config_class_path: str, hub_name: str | None = None) -> None:
    """Make a family's pipeline folders known to every family's loader (a folder of another family is refused with
    the ``model.policy.class_path`` that trains it); ``hub_name``: a lower-case pattern of its Hub ids."""
    FAMILY_CONFIGS[pipeline_class] = (family, config_class_path)
    if hub_name:
        FAMILY_NAMES[hub_name] = pipeline_class


def family_config(model: str | os.PathLike, default: str = "divrl.policy.KontextConfig") -> type:
    """The policy config class (``model.policy.class_path``) that trains ``model``, read from its ``model_index.json``:
    in a local folder, or for a Hub id in the local Hub cache (no network: ``hf download ID`` first); an id not in the
    cache by its name (a registered family's pipeline class, or its name pattern, e.g. ``FLUX.1-Kontext``). ``default``
    for ``tiny``, a pipeline no family registered, or an index that cannot be read (that config's own loader then
    says what is wrong with the model)."""
    from importlib import import_module

    name = os.fspath(model)
    local = Path(name).expanduser()
    index: Path | None = local / "model_index.json" if local.is_dir() else None
    if index is None and name != "tiny" and not local.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "model_index.json")
            index = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a valid repo id: the default config's loader says so
            index = None
    try:
        found = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index else None
    except (OSError, ValueError, AttributeError):
        found = None
    if found is None:  # not read: recognise a family by its Hub names
        found = next((cls for pattern, cls in FAMILY_NAMES.items() if pattern in name.lower()), None)
    module, _, cls = FAMILY_CONFIGS.get(found, ("", default))[1].rpartition(".")
    return getattr(import_module(module), cls)


def precompute_config(model: str, **settings):
    """The settings that load ``model`` for ``divrl data --precompute``: its family's config (:func:`family_config`)
    without an adapter, with the family's ``PRECOMPUTE_SETTINGS`` (defaults a model may refuse that precomputing
    needs nothing of) and ``settings`` (``max_sequence_length``)."""
    cls = family_config(model)
    return cls(model=model, lora=None, **{**getattr(cls, "PRECOMPUTE_SETTINGS", {}), **settings})


def load_family_pipeline(
    pipeline_class,
    model: str | os.PathLike,
    *,
    who: str,
    torch_dtype="auto",
    local_files_only: bool = False,
    revision: str | None = None,
    skip: dict | None = None,
):
    """``pipeline_class.from_pretrained(model)`` with errors that say what to do.

    Args:
        pipeline_class: the family's diffusers pipeline class.
        model: a Hub id or a folder written by ``pipeline_class.save_pretrained``.
        who: the policy class named in messages (``KontextPolicy``).
        torch_dtype: ``"auto"`` (bfloat16 with CUDA, float32 on CPU), ``None`` (as stored) or a dtype name.
        local_files_only, revision: as for ``from_pretrained``.
        skip: components not to load (``{"text_encoder": None, ...}``).

    Raises:
        ModelLoadError: the model is missing, a file, another family's pipeline, gated, or not reachable.
    """
    name, cls = os.fspath(model), pipeline_class.__name__
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"{who}: {name!r} has no model_index.json; it is not a diffusers pipeline folder. Save "
                f"one with {cls}.save_pretrained(folder), or pass a Hub id"
            )
        _check_family(index, cls, who, name)
    elif local.exists():
        raise ModelLoadError(
            f"{who}: model {name!r} is a file, not a diffusers pipeline folder; pass the folder holding "
            f"model_index.json ({cls}.save_pretrained), or a Hub id"
        )
    elif name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a Hub id has exactly one "/"
        raise ModelLoadError(
            f"{who}: model folder {name!r} does not exist (relative paths start at {os.getcwd()!r}; run "
            f"from the repository root for the shipped configs); pass an existing folder or a Hub id"
        )
    if torch_dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        dtype = parse_dtype(torch_dtype, who)
        return pipeline_class.from_pretrained(
            name, dtype=dtype, local_files_only=local_files_only, revision=revision, **(skip or {})
        )
    except Exception as err:  # noqa: BLE001 - re-raised with instructions, original chained
        if isinstance(err, (OSError, ValueError)) or type(err).__name__.endswith(("RepoError", "HTTPError")):
            raise ModelLoadError(load_hint(name, err, who, cls)) from err
        raise


def _check_family(index: Path, cls: str, who: str, name: str) -> None:
    """Refuse a pipeline folder of another model family, naming the ``model.policy.class_path`` that loads it."""
    try:
        found = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # diffusers' own error names a broken model_index.json
    if found in FAMILY_CONFIGS and found != cls:
        family, config = FAMILY_CONFIGS[found]
        mine = FAMILY_CONFIGS.get(cls, (cls, ""))[0]
        raise ModelLoadError(
            f"{who}: {name!r} is a {found} folder ({family}), and this config trains {mine} ({cls}); "
            f"set model.policy.class_path: {config} for it, or pass a {mine} model"
        )


def load_hint(name: str, err: Exception, who: str = "KontextPolicy", cls: str = "FluxKontextPipeline") -> str:
    """What to do when ``name`` could not be loaded (gated, offline, a wrong id), with the original error."""
    text = str(err)
    gated = "gated" in text.lower() or "401" in text or "403" in text or type(err).__name__ == "GatedRepoError"
    if gated:
        what = (
            f"{name!r} is gated: accept its licence on the model's Hub page, then log in with `hf auth login` (or "
            f"set HF_TOKEN)"
        )
    else:
        what = (
            f"{name!r} is neither a local diffusers folder nor reachable on the Hugging Face Hub (offline, or a "
            f"wrong id). Download it once (`hf download {name}`) and set model.policy.local_files_only: true (or "
            f"HF_HUB_OFFLINE=1), or pass the path of a folder written by {cls}.save_pretrained"
        )
    return f"{who}: cannot load the model: {what}. Original error: {type(err).__name__}: {text[:300]}"

"""What the ``divrl`` command checks and how it words errors: the command line before jsonargparse parses it
(:func:`check_command_line`: config files, duplicate keys, moved settings, ``--methods``), jsonargparse's own refusals
condensed to one sentence (:func:`condensed_parser_error`), and which exceptions are divrl's sentences about its
input rather than bugs (:func:`expected_error`)."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

__all__ = ["check_command_line", "condensed_parser_error", "expected_error"]


def expected_error(err: BaseException) -> str | None:
    """The sentence of an error divrl raised on purpose about its input (a ``ValueError``, ``OSError`` or
    ``RuntimeError`` raised in divrl's own code, or one of them inside jsonargparse's "Does not validate against any of
    the Union subtypes"), or ``None`` for anything else: a bug, whose traceback the user needs."""
    import traceback

    text = str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text:  # no bug: the run is too big
        return (
            f"out of memory ({text.splitlines()[0][:200]}); make the run smaller: data.batch_size, "
            f"sampling.group_size or sampling.resolution, or set system.rollout_micro_batch_size, "
            f"objective.micro_batch_size, policy.gradient_checkpointing"
        )
    if isinstance(err, ValueError) and "Does not validate against any of the Union subtypes" in text:
        reasons = [
            line[4:]
            for line in text.splitlines()
            if line.startswith("  - ")  # the subtypes' own reasons,
            and not line[4:].startswith(("Expected a <class", "Not a valid subclass"))
        ]  # not the menu
        return "; ".join(reasons) or None
    frames = traceback.extract_tb(err.__traceback__)
    package = Path(__file__).resolve().parent
    # raised on purpose: the innermost frame is a ``raise`` statement in divrl (a tensor-shape RuntimeError or an
    # unpacking ValueError raised by torch or Python on a divrl line is a bug, and keeps its traceback)
    ours = bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(package) and _raises(frames[-1])
    if isinstance(err, KeyError) and ours:
        return str(err.args[0]) if err.args else None
    return text if ours and isinstance(err, (ValueError, OSError, RuntimeError, FloatingPointError)) and text else None


def _raises(frame) -> bool:
    """Whether the statement at ``frame`` raises (its first line, or the line the frame points to, says ``raise``)."""
    import linecache

    line = (frame.line or "").strip()
    if line.startswith("raise"):
        return True
    # a multi-line raise: the frame may point inside it; look back to the statement's first line
    for number in range(frame.lineno, max(frame.lineno - 8, 0), -1):
        text = linecache.getline(frame.filename, number).strip()
        if text.startswith("raise"):
            return True
        if text.endswith(":") or not text:
            return False
    return False


def check_command_line(args: Sequence[str]) -> list[str]:
    """What jsonargparse would refuse with its usage screen, refused with one sentence before it parses: a ``--config``
    file that is missing, not UTF-8 or not YAML (named, with the line), and settings of the former ``model.grpo``
    group (on the command line or in a config), each named with where it moved. Inline (``--config '{...}'``) and
    remote (``s3://...``) configs are left to jsonargparse. Returns the configs given."""
    from divrl.eval.runner import method_name
    from divrl.training.checkpoints import moved_setting

    flags = ("--config", "-c")
    configs = [value for flag, value in zip(args, [*args[1:], None]) if flag in flags and value]
    configs += [arg.split("=", 1)[1] for arg in args if arg.startswith(("--config=", "-c="))]
    old = [arg.split("=", 1)[0].removeprefix("--model.grpo.") for arg in args if arg.startswith("--model.grpo.")]
    methods = [v for f, v in zip(args, [*args[1:], None]) if f == "--methods" and v] + [
        a.split("=", 1)[1] for a in args if a.startswith("--methods=")
    ]
    for value in methods:  # jsonargparse would answer with its usage screen and a Union error
        given = _yaml(value, f"--methods {value!r}")
        if given is None:  # null clears a config's methods (score --samples_dir alone)
            continue
        if not isinstance(given, dict):
            raise ValueError(
                f"--methods takes a mapping of method name to weights (a LoRA, a run's .ckpt, or null for "
                f"the base model), e.g. '{{base: null, mine: runs/demo/lora/final}}'; got {value!r}"
            )
        for name in given:  # a key YAML reads as a date or a number is a string to jsonargparse
            method_name(str(name), "--methods")
    where = "on the command line"
    for value in configs:
        config, path = _config(value)
        grpo = (
            config.get("model", {}).get("grpo")
            if isinstance(config, dict) and isinstance(config.get("model"), dict)
            else None
        )
        if isinstance(grpo, dict) and not old:
            old, where = list(grpo), f"in --config {path or value}"
    if old:
        moves = ", ".join(f"model.grpo.{key} -> model.{moved_setting(key)}" for key in old)
        raise ValueError(
            f"the settings of model.grpo {where} moved when they were grouped by concern ({moves}); "
            f"rename them (the README's Training section lists every move)"
        )
    return configs


def _config(value: str):
    """A ``--config`` value read as YAML: ``(content, path)``; a remote one is not read (``(None, None)``), an inline
    mapping has no path."""
    path = Path(value)
    if "://" in value:
        return None, None
    if path.is_dir():
        raise IsADirectoryError(f"--config {value} is a folder; pass a YAML file (e.g. configs/demo.yaml)")
    if not path.is_file():
        inline = _yaml(value, f"--config {value!r}") if "\n" in value or value.lstrip().startswith("{") else None
        if isinstance(inline, dict):
            return inline, None
        raise FileNotFoundError(f"--config {value} does not exist (relative paths start at {os.getcwd()!r})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--config {path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset {err.start}); "
            f"save it as UTF-8"
        ) from None
    config = _yaml(text, f"--config {path}")
    if not isinstance(config, dict):
        raise ValueError(
            f"--config {path} {'is empty' if config is None else f'holds a {type(config).__name__}'}, not a "
            f"mapping of settings (trainer:, model:, data:); fix the file or drop it"
        )
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    sections = {
        **{k: v for k, v in config.items() if k in ("trainer", "model", "data")},
        **{f"model.{k}": v for k, v in model.items() if k in ("policy", "sampling", "system")},
    }
    bad = next(((k, v) for k, v in sections.items() if isinstance(v, (list, int, float))), None)
    if bad is not None:
        raise ValueError(
            f"{bad[0]} in --config {path} is a {type(bad[1]).__name__}; it takes a mapping of settings "
            f"({bad[0]}: {{name: value, ...}})"
        )
    return config, path


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key == "<<":  # merge keys may repeat
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, what: str):
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{what} is not valid YAML: {getattr(err, 'problem', None) or err}{at}; fix it") from None


# ---------------------------------------------------------------------------------------------------- jsonargparse

_SECTIONS = {  # where a command line key's candidates come from, for "did you mean"
    "trainer": ("lightning.pytorch", "Trainer"),
    "model": ("divrl.training.module", "DivRLModule"),
    "model.sampling": ("divrl.objectives.base", "SamplingConfig"),
    "model.system": ("divrl.training.config", "SystemConfig"),
    "model.policy": ("divrl.policy", "KontextConfig"),
    "data": ("divrl.data.datamodule", "IdentityDataModule"),
}
_TOP = ("trainer", "model", "data", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path", "config")


def condensed_parser_error(message: str, command: str) -> str:
    """jsonargparse's refusal (printed after its usage screen, a Union's menu of subtypes and the whole value given)
    as one sentence: the key, what is wrong with it, and the closest valid name when one is near."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"class_path '([\w.]+)'", message)
    where = keys[0] if keys else ""
    if classes and len(keys) > 1:
        where += f" ({classes[-1]}) {'.'.join(keys[1:])}"
    elif classes:
        where += f" ({classes[-1]})"
    unknown = re.search(r"does not accept option '([^']+)'", message) or re.search(
        r"nrecognized arguments: --([\w.+=-]+?)(?:[ =]|$)", message
    )
    missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message)
    refused = re.search(r"Option '(\w+)' is not accepted", message)
    typed = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", message)
    if unknown:
        key = unknown.group(1)
        sentence = f"unknown option --{key}{_did_you_mean_key(key)}"
    elif missing:
        module, name = missing.groups()
        sentence = f"{where}: {module}.{name} does not exist{_did_you_mean(name, _public_names(module), module + '.')}"
    elif refused:
        option = refused.group(1)
        sentence = (
            f"{where}: {classes[-1] if classes else 'it'} takes no option {option!r}"
            f"{_did_you_mean(option, _parameters(classes[-1]) if classes else [])}"
        )
    elif typed:
        sentence = f"{where}: expected {typed.group(1)}, got {typed.group(2).strip()!r}"
    else:
        given = re.search(r"Given value: (.*)", message)
        expected = [_plain_type(m) for m in re.findall(r"- Expected a (.+)", message)] + [
            f"a mapping of {name} settings" for name in re.findall(r"- Not a valid subclass of (\w+)", message)
        ]
        if given and expected:
            sentence = f"{where}: got {given.group(1).strip()[:80]!r}; expected {' or '.join(dict.fromkeys(expected))}"
        else:
            lines = [
                line.strip(" -")
                for line in message.splitlines()
                if line.strip(" -")
                and not line.strip().startswith(
                    (
                        "Given value",
                        "Subtypes",
                        "Subclass types",
                        "- a ",
                        "a class path",
                        "a dict",
                        "Errors:",
                        "Does not ",
                    )
                )
            ]
            sentence = "; ".join(lines[:3])
    return f"{sentence} ({command} --help lists every option)"


def _plain_type(text: str) -> str:
    text = re.sub(r"<class '(\w+)'>", r"\1", text.strip())
    return re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", text).replace("NoneType", "null")


def _public_names(module: str) -> list[str]:
    import importlib

    try:
        return [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except ImportError:
        return []


def _parameters(class_path: str) -> list[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        return [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters if p != "self"]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _did_you_mean(name: str, candidates: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _did_you_mean_key(key: str) -> str:
    """A suggestion for an unknown dotted key: its first part among the sections, or its last part among the fields of
    the section it names (``model.sampling.num_stepz`` → ``model.sampling.num_steps``)."""
    parts = key.split(".")
    if parts[0] not in _TOP:
        close = difflib.get_close_matches(parts[0], _TOP, n=1, cutoff=0.6)
        return f"; did you mean --{'.'.join([close[0], *parts[1:]])}?" if close else ""
    section = ".".join(parts[:-1])
    if section in _SECTIONS:
        module, name = _SECTIONS[section]
        return _did_you_mean(parts[-1], _parameters(f"{module}.{name}"), f"--{section}.")
    return ""

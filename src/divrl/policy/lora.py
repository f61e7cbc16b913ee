"""LoRA adapters on a diffusers transformer (peft), and their files in diffusers' format: generic over model families.

A diffusers transformer (``ModelMixin`` with ``PeftAdapterMixin``: FLUX, SD3, ...) gets its adapter with
:func:`add_adapter` (float32 adapter weights on a base of any dtype). :func:`adapter_state` reads the adapter's weights
with peft's names, :func:`save_adapter` writes them as ``pytorch_lora_weights.safetensors`` through the family's
pipeline class (``FluxKontextPipeline.save_lora_weights``...), so the pipeline's ``load_lora_weights`` loads them, and
:func:`load_adapter` reads such a file back into the adapter with errors that say what does not fit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from divrl.policy.sharding import clean_name, full_tensor, unwrapped

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoRAConfig",
    "add_adapter",
    "adapter_disabled",
    "adapter_state",
    "save_adapter",
    "load_adapter",
    "whole_adapter_state",
    "LORA_FILE",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' file name of a LoRA (what ``load_lora_weights(folder)`` looks for)."""

DEFAULT_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
)
"""The published DivRL run's LoRA targets (docs/reference.md): every attention and MLP projection of the FLUX blocks."""


@dataclass
class LoRAConfig:
    """LoRA adapter on the transformer (peft).

    Attributes:
        rank: adapter rank ``r`` (DivRL: 64).
        alpha: scaling numerator ``α``; the update is scaled by ``α / r`` (DivRL: 128).
        target_modules: module-name suffixes that get an adapter (DivRL's list by default).
        init: peft ``init_lora_weights``: ``"gaussian"`` (DivRL) draws A from a Gaussian and sets B = 0, so a fresh
            adapter leaves the model unchanged (KL to the reference policy is 0).
        dropout: LoRA dropout (0 in DivRL; non-zero makes rollout and training log-probs differ).
    """

    rank: int = 64
    alpha: float = 128.0
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    init: str = "gaussian"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"policy.lora.rank must be an integer >= 1 (DivRL: 64), got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(
                f"policy.lora.alpha must be > 0 (the update is scaled by alpha / rank; DivRL: 128), got {self.alpha!r}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"policy.lora.dropout must lie in [0, 1) (DivRL: 0), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                f"policy.lora.target_modules must be a non-empty list of module-name suffixes, got "
                f"{self.target_modules!r}"
            )

    def to_peft(self):
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            init_lora_weights=self.init if self.init != "default" else True,
            lora_dropout=self.dropout,
        )


def add_adapter(network: nn.Module, config: LoRAConfig, compute_dtype: torch.dtype = torch.float32) -> None:
    """Add ``config``'s adapter to a diffusers transformer; the adapter weights train, in float32 whatever the
    base's dtype (the frozen base keeps its own), and compute in ``compute_dtype``
    (:func:`divrl.policy.compute.cast_lora_compute`; float32: peft's own float32 path)."""
    from divrl.policy.compute import cast_lora_compute

    modules = dict(network.named_modules())
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]

    def matching_nothing(names: list[str]) -> list[str]:  # peft's rule for a list: the name, or a "."-suffix of it
        return [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]

    unmatched = matching_nothing(list(modules))  # peft would drop a typo silently when another target matches
    try:
        if not unmatched:
            network.add_adapter(
                replace(config, target_modules=_layer_targets(config.target_modules, modules)).to_peft()
            )
    except ValueError:  # peft's NoMatchingPeftModuleError ("Target modules {...} not found"), or a non-Linear match
        unmatched = matching_nothing(linear)
        if not unmatched:
            raise
    if unmatched:
        parts = [name.split(".") for name in linear]  # suffixes after the block index: "attn.to_q"
        suffixes = dict.fromkeys(".".join(p[next((i + 1 for i, s in enumerate(p) if s.isdigit()), 0) :]) for p in parts)
        have = [t for t in DEFAULT_LORA_TARGETS if t in suffixes] or list(suffixes)[:8]
        raise ValueError(
            f"policy.lora.target_modules {unmatched} match no Linear layer of the network (a target is a "
            f"module-name suffix); use targets it has, e.g. [{', '.join(have)}]"
        )
    for name, parameter in network.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(True)
    cast_lora_compute(network, compute_dtype)


@contextlib.contextmanager
def adapter_disabled(network: nn.Module) -> Iterator[None]:
    """The network with its adapter switched off for the duration of the block (no weight copy)."""
    network.disable_adapters()
    try:
        yield
    finally:
        network.enable_adapters()


def adapter_state(network: nn.Module) -> dict[str, Tensor]:
    """peft's adapter state dict (``...lora_A.weight``) read from the parameters, by their unwrapped names.

    ``state_dict()`` of an FSDP1-wrapped network would gather every block's frozen weights to pick out the adapter's;
    the parameters are read directly instead. The tensors may be sharded (FSDP2): see :func:`whole_adapter_state`.
    """
    from peft import get_peft_model_state_dict

    inner = unwrapped(network)
    # peft picks the adapter's keys by its layers' module names: peft 0.22 drops FSDP1's wrapper names from every
    # level of them, earlier versions only from the root's. Each parameter is offered under both spellings (one key
    # when nothing is wrapped); each version matches one of them, and the result is read by the unwrapped names
    named = dict(inner.named_parameters())
    offered = {**named, **{clean_name(k): v for k, v in named.items()}}
    state = get_peft_model_state_dict(inner, state_dict=offered)
    return {clean_name(k): v for k, v in state.items()}


def whole_adapter_state(network: nn.Module) -> dict[str, Tensor]:
    """The adapter weights whole and on the CPU. With a sharded (FSDP2) network the shards are gathered: a
    collective, every rank must call it. Under FSDP1 the adapter is unwrapped (whole on every rank)."""
    return {k: full_tensor(v.detach()).cpu() for k, v in adapter_state(network).items()}


def save_adapter(network: nn.Module, directory: str | os.PathLike, lora_format, state: dict[str, Tensor]) -> Path:
    """Write ``state`` (the adapter's weights, peft names) as ``<directory>/pytorch_lora_weights.safetensors``.

    ``lora_format`` is the family's diffusers pipeline class: its ``save_lora_weights`` writes the file its
    ``load_lora_weights`` reads. The adapter's rank, alpha and targets travel in the file's metadata (without them
    diffusers assumes alpha = rank); the same weights always give the same bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # peft keeps target_modules as a set: sorted, the same weights always give the same file bytes
    metadata = {
        k: sorted(v) if isinstance(v, (set, frozenset)) else v
        for k, v in unwrapped(network).peft_config["default"].to_dict().items()
    }
    lora_format.save_lora_weights(
        directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata, safe_serialization=True
    )
    file = directory / LORA_FILE
    with contextlib.suppress(OSError):  # file systems that refuse chmod keep the file as written
        file.chmod(0o644)  # safetensors writes through a private temporary file (0600): readable like the rest
    return file


def load_adapter(network: nn.Module, path: str | os.PathLike) -> None:
    """Load adapter weights written by :func:`save_adapter` (a folder or the ``.safetensors`` file) into the
    network's adapter; the targets and the rank must match (the error says what differs and the fix)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / LORA_FILE
    if not file.is_file():
        raise FileNotFoundError(_no_lora_file(Path(path), file))
    try:
        state = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}
    except Exception as err:  # noqa: BLE001 - safetensors' own error type, OSError: re-raised with the file named
        raise ValueError(
            f"load_lora: {file} is damaged or not a safetensors file ({type(err).__name__}: {err}); "
            f"export the LoRA again or copy it anew"
        ) from err
    ours = adapter_state(network)
    if set(state) != set(ours):
        missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        raise ValueError(
            f"load_lora: {file} does not fit this adapter ({len(missing)} missing keys e.g. {missing[:2]}, "
            f"{len(extra)} unexpected e.g. {extra[:2]}); use the same lora target_modules as the run that wrote it"
        )
    shapes = [k for k in state if state[k].shape != ours[k].shape]
    if shapes:
        raise ValueError(
            f"load_lora: {file} has rank {state[shapes[0]].shape} where this adapter has {ours[shapes[0]].shape} "
            f"({shapes[0]}); set policy.lora.rank to the trained rank"
        )
    saved, config = _saved_alpha(file), unwrapped(network).peft_config["default"]
    if saved is not None and saved != config.lora_alpha:  # the same weights, another scale: other images, silently
        raise ValueError(
            f"load_lora: {file} was trained with alpha {saved:g} (its metadata) where this adapter has "
            f"{config.lora_alpha:g}; set policy.lora.alpha to {saved:g}"
        )
    set_peft_model_state_dict(network, state)


def _layer_targets(targets: Sequence[str], modules: dict[str, nn.Module]) -> tuple[str, ...]:
    """``targets`` for peft: a suffix that also names a module peft cannot adapt (an ``attn.to_out`` that is a Linear in one
    kind of block and a list in another) becomes the full names of the layers it names
    that peft can adapt; every other suffix stays as given."""
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    resolved: list[str] = []
    for target in targets:
        named = [name for name in modules if name == target or name.endswith("." + target)]
        if all(isinstance(modules[name], adaptable) for name in named):
            resolved.append(target)
        else:  # none adaptable: kept as given, for peft (and the refusal below) to name it
            resolved += [name for name in named if isinstance(modules[name], adaptable)] or [target]
    return tuple(resolved)


def _no_lora_file(path: Path, file: Path) -> str:
    """Why ``path`` gives no LoRA file, naming what the folder holds instead: LoRA folders one level below it (a
    run's ``lora/`` holds ``final`` and ``stage1``), or a run's checkpoints (``checkpoints/``)."""
    if path.is_dir():
        below = sorted(p.parent for p in path.glob(f"*/{LORA_FILE}"))
        if below:
            return (
                f"load_lora: {path} holds no {LORA_FILE} but LoRA folders below it: pass one of "
                f"{', '.join(map(str, below))}"
            )
        checkpoints = sorted(path.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name))
        if checkpoints:
            names = ", ".join(p.name for p in checkpoints[:5]) + (", ..." if len(checkpoints) > 5 else "")
            return f"load_lora: {path} is a folder of checkpoints ({names}): pass one of them, e.g. {checkpoints[0]}"
    return f"load_lora: {str(file)!r} does not exist; pass a folder written by the LoRA export"


def _saved_alpha(file: Path) -> float | None:
    """The LoRA alpha recorded in a diffusers LoRA file's metadata, or ``None`` when it has none."""
    import json

    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        metadata = (handle.metadata() or {}).get("lora_adapter_metadata")
    if not metadata:
        return None
    alpha = json.loads(metadata).get("transformer.lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) else None

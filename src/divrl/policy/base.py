"""The seam between a model family and the rest of divrl: :class:`Policy`, its :class:`Conditioning` and
:class:`PolicyConfig`.

Sampling (:mod:`divrl.grpo`), the objectives, the Lightning layer and the data never name a model component: they see
a policy only through the methods of :class:`Policy`. A new family is one folder in
``divrl/policy/`` with a :class:`Policy` subclass and a :class:`PolicyConfig` subclass that builds it; YAML selects it
with ``model.policy.class_path``. :class:`~divrl.policy.KontextPolicy` is the reference implementation.

The LoRA adapter, its export in diffusers' format and the KL reference of full fine-tuning are diffusers-generic and
implemented here once (:mod:`divrl.policy.lora`, :mod:`divrl.policy.reference`).
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from divrl.policy import lora as L
from divrl.policy.compute import (
    CHECKPOINTING,
    check_attention_backend,
    configure_units,
    enable_tf32,
    set_attention_backend,
)
from divrl.policy.reference import FrozenReference
from divrl.policy.sharding import unwrapped
from divrl.utils import parse_dtype

if TYPE_CHECKING:
    from divrl.data.schema import IdentityRecord
    from divrl.data.stream import ConditionSample

__all__ = ["Conditioning", "Policy", "PolicyConfig", "ModelLoadError", "DEFAULT_SDPA_BACKENDS", "sdpa_context"]

DEFAULT_SDPA_BACKENDS = ("flash", "efficient", "math")
"""The attention kernels divrl lets PyTorch use by default: cuDNN is left out (its bf16 backward returns NaN gradients
on H100 with torch 2.11, measured on the tiny model: every update non-finite; pytorch/pytorch#196678)."""


class ModelLoadError(OSError):
    """A model could not be loaded (missing, gated, or offline); the message says what to do."""


@runtime_checkable
class Conditioning(Protocol):
    """What a policy's :meth:`~Policy.encode` returns for a batch of samples: opaque to everyone but the policy.

    The sampler and the objectives only read its batch size and image size and select rows of it (micro-batches).
    """

    height: int
    width: int

    @property
    def batch_size(self) -> int: ...

    def select(self, index: Tensor | Sequence[int] | slice) -> Conditioning: ...


class Policy(nn.Module, ABC):
    """A flow-matching image generator as the policy of on-policy RL: a denoising *network* (the transformer) with the
    encoders that condition it and the decoder that turns latents into images.

    Subclasses implement the abstract methods and set :attr:`network_name`, :attr:`lora_format`, :attr:`lora_config`
    and :attr:`train_transformer`; the adapter, its files, the KL reference and the attention kernels come from here.

    Args:
        sdpa_backends: the attention kernels PyTorch may use in :meth:`attention` (see :func:`sdpa_context`).
    """

    network_name: ClassVar[str] = "transformer"
    """The attribute holding the trained network (a diffusers ``ModelMixin``); its checkpoint keys start with it."""
    lora_format: ClassVar[type | None] = None
    """The family's diffusers pipeline class: its ``save_lora_weights`` / ``load_lora_weights`` define the LoRA file."""
    lora_config: L.LoRAConfig | None = None
    """The adapter on the network, or ``None`` (full fine-tuning or inference)."""
    train_transformer: bool = False
    """Full fine-tuning: every weight of the network trains."""
    compute_dtype: torch.dtype = torch.float32
    """The dtype the trained weights compute in: the adapter's matmuls (float32 weights cast on the fly, set up by
    :func:`divrl.policy.lora.add_adapter`), or with full fine-tuning the network's, under autocast
    (:func:`divrl.policy.compute.autocast_forward`)."""

    def __init__(self, *, sdpa_backends: Sequence[str] | None = DEFAULT_SDPA_BACKENDS):
        super().__init__()
        self.sdpa_backends = None if sdpa_backends is None else list(sdpa_backends)
        self._frozen: FrozenReference | None = None  # full fine-tuning's KL reference (keep_reference)

    # ------------------------------------------------------------------------------------------------ the family

    @abstractmethod
    def encode(self, samples: Sequence[ConditionSample], height: int, width: int, group_size: int = 1) -> Conditioning:
        """The conditioning of ``len(samples)`` conditions (prompt, every reference, precomputed entries), each
        repeated ``group_size`` times: rows ``i·G .. i·G + G − 1`` belong to ``samples[i]``."""

    @abstractmethod
    def initial_noise(
        self, cond: Conditioning, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """The initial latents ``x`` at σ = 1 for ``cond``'s rows, drawn as the family's pipeline draws them."""

    @abstractmethod
    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Conditioning) -> Tensor:
        """The network's velocity for ``latents`` at noise level ``sigma`` (a float or a ``(B,)`` tensor); gradients
        flow to the trainable weights when enabled."""

    @abstractmethod
    def sigmas(self, num_steps: int, cond: Conditioning) -> Tensor:
        """The ``(num_steps + 1,)`` float32 noise levels of a ``num_steps`` sampler, from 1 down to 0, as the family's
        own scheduler configuration defines them."""

    @abstractmethod
    def decode(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """Final latents → images ``(B, 3, H, W)`` float32 in [0, 1]."""

    @abstractmethod
    def shard_units(self, network: nn.Module | None = None) -> list[nn.Module]:
        """The repeated blocks of ``network`` (default: the trained one): one FSDP unit each, and the units a
        CPU-offloaded reference streams through the device."""

    @abstractmethod
    def frozen_parts(self) -> list[nn.Module]:
        """The frozen modules outside the network that every rank holds whole (VAE, text encoders)."""

    def encode_images(
        self, images: Sequence, height: int, width: int, keys: Sequence[str | None] | None = None
    ) -> Tensor:
        """The clean latents ``x₀`` of ``images`` (a row each, as :meth:`velocity` takes them) at ``height × width``,
        for flow-matching losses on given images (SFT targets, preference pairs); ``keys`` name images for caching."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode images to latents (image_latents)")

    def time_shift(self, cond: Conditioning) -> float:
        """The shift ``s`` the family's sampler applies to uniform times at ``cond``'s size (``σ' = s·σ / (1 + (s −
        1)·σ)``; 1 = none), for training timesteps drawn where the sampler spends its steps."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no time shift; use timestep sampling uniform or logit_normal"
        )

    def flops_per_call(self, cond: Conditioning) -> float | None:
        """Forward FLOPs of one network call for one sample of ``cond`` (for throughput and MFU), or ``None`` when
        the family has no count (the perf metrics are then not logged)."""
        return None

    def precompute(self, record: IdentityRecord, resolution: int) -> dict:
        """The identity's conditioning computed ahead of training (``divrl data --precompute``), an opaque payload
        that only this family's :meth:`encode` reads."""
        raise NotImplementedError(f"{type(self).__name__} cannot precompute conditioning")

    def drop_encoders(self) -> Policy:
        """Remove the encoders (text, image) for training on precomputed conditioning only."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop its encoders; set policy.text_encoders: true")

    def clear_caches(self) -> None:
        """Forget cached encodings (no-op unless the family caches)."""

    # ------------------------------------------------------------------------------------------------ provided

    @property
    def network(self) -> nn.Module:
        """The denoising network being trained (possibly wrapped by a sharding strategy)."""
        return getattr(self, self.network_name)

    def wrap_network(self, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Use ``wrap(network)`` in place of the network from now on (a sharding wrapper: FSDP1's root unit)."""
        wrapped = wrap(self.network)
        setattr(self, self.network_name, wrapped)  # nn.Module.__setattr__ re-registers it under the same name
        return wrapped

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (the adapter, or with full fine-tuning the network)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in (that of the frozen base)."""
        return next(p.dtype for name, p in self.network.named_parameters() if "lora_" not in name)

    def attention(self) -> contextlib.AbstractContextManager:
        """A context restricting scaled-dot-product attention to :attr:`sdpa_backends`, for rollouts and updates
        alike (the same kernel on both paths keeps the on-policy ratio at 1)."""
        return sdpa_context(self.sdpa_backends)

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """The reference policy of the KL term, for the duration of the block: with a LoRA, the same network with the
        adapter off (no weight copy); with full fine-tuning, the frozen copy made by :meth:`keep_reference`."""
        if self.lora_config is not None:
            with L.adapter_disabled(self.network):
                yield
            return
        if self._frozen is None:
            raise RuntimeError(
                "reference_policy: full fine-tuning has no reference policy; call keep_reference() before training (the "
                "training module does when the objective's kl_beta > 0)"
            )
        device, trained, frozen = self.device, self.network, self._frozen
        setattr(self, self.network_name, frozen.module)
        try:
            with frozen.on(device, self.shard_units(frozen.module)):
                yield
        finally:
            setattr(self, self.network_name, trained)

    def keep_reference(self, offload: bool = False) -> nn.Module:
        """Full fine-tuning: keep a frozen copy of the network as it is now (the initial policy) as the reference of
        the KL term, in the trained weights' dtype (so the first update's KL is exactly 0). It is not a submodule:
        never trained, saved in checkpoints, or moved by ``.to()``. ``offload=True`` keeps it on the CPU and streams it
        block by block (device memory: one block); under FSDP2 shard the returned module instead."""
        if self.lora_config is not None:
            raise RuntimeError("keep_reference: a LoRA policy's reference is the adapter switched off; no copy needed")
        self._frozen = FrozenReference(self.network, offload)
        return self._frozen.module

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The network with the LoRA adapter switched off (the base model)."""
        if self.lora_config is None:
            raise RuntimeError("adapter_disabled: this policy has no LoRA adapter (lora=None)")
        with L.adapter_disabled(self.network):
            yield

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The adapter weights with peft's names, whole and on the CPU (gathered under FSDP2: every rank calls it)."""
        if self.lora_config is None:
            raise RuntimeError("lora_state_dict: this policy has no LoRA adapter (lora=None)")
        return L.whole_adapter_state(self.network)

    def export_state(self) -> dict[str, Tensor]:
        """What :meth:`export` writes, whole: the adapter, or with full fine-tuning the network's state dict (on the
        CPU). Sharded weights are gathered: a collective, every rank calls it."""
        if self.lora_config is not None:
            return self.lora_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.network, options=options)

    def export(self, directory: str | os.PathLike, state: dict[str, Tensor] | None = None) -> Path:
        """Write the trained weights (``state``, default :meth:`export_state`): the adapter as
        ``<directory>/pytorch_lora_weights.safetensors`` (the family pipeline's ``load_lora_weights`` reads it), or
        with full fine-tuning the network as a diffusers model folder ``<directory>/<network_name>/``."""
        if self.lora_config is None and not self.train_transformer:
            raise RuntimeError("export: this policy trains nothing (no LoRA adapter, no full fine-tuning)")
        state = state if state is not None else self.export_state()
        if self.lora_config is not None:
            return L.save_adapter(self.network, directory, self.lora_format, state)
        from divrl.policy.sharding import save_full_network

        return save_full_network(unwrapped(self.network), state, Path(directory) / self.network_name)

    def save_lora(self, directory: str | os.PathLike, state: dict[str, Tensor] | None = None) -> Path:
        """Write the adapter in diffusers' format (see :meth:`export`)."""
        if self.lora_config is None:
            raise RuntimeError("save_lora: this policy has no LoRA adapter (lora=None)")
        return self.export(directory, state)

    def load_lora(self, path: str | os.PathLike) -> None:
        """Load an adapter written by :meth:`save_lora` (a folder or the ``.safetensors`` file); the rank and the
        targets must match (the error says what differs)."""
        if self.lora_config is None:
            raise RuntimeError("load_lora: this policy has no LoRA adapter; set policy.lora to the trained rank/alpha")
        L.load_adapter(self.network, path)

    def load(self, path: str | os.PathLike) -> None:
        """Load weights written by :meth:`export`: a LoRA folder or file, or a full fine-tune's diffusers model folder
        (``<path>/<network_name>/config.json`` or ``<path>/config.json``)."""
        path = Path(path)
        folder = path / self.network_name if (path / self.network_name).is_dir() else path
        if (folder / "config.json").is_file():
            trained = type(unwrapped(self.network)).from_pretrained(folder)
            self.network.load_state_dict(trained.state_dict())
        else:
            self.load_lora(path)


def sdpa_context(backends: Sequence[str] | None) -> contextlib.AbstractContextManager:
    """A context manager restricting scaled-dot-product attention to ``backends`` (``flash``, ``efficient``,
    ``cudnn``, ``math``); ``None`` lets PyTorch choose."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backends is None:
        return contextlib.nullcontext()
    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    unknown = [b for b in backends if b not in names]
    if unknown or not backends:
        raise ValueError(f"policy.sdpa_backends: unknown {unknown or 'empty list'}; choose from {sorted(names)}")
    return sdpa_kernel([names[b] for b in backends])


@dataclass
class PolicyConfig:
    """Which generator to train and how: the settings every model family shares.

    A family subclasses it and implements :meth:`load` (:class:`~divrl.policy.KontextConfig` for FLUX.1 Kontext, the
    default). In YAML, ``model.policy`` is a mapping of these fields for the default family, or
    ``{class_path: <a PolicyConfig subclass>, init_args: {...}}`` for another.

    Attributes:
        model: a Hub id or a local diffusers pipeline folder (the family may accept more, e.g. ``"tiny"``).
        lora: the LoRA adapter; ``null`` trains no adapter (full fine-tuning with ``train_transformer``).
        torch_dtype: dtype of the frozen base: ``"auto"`` (bfloat16 with CUDA, float32 on CPU), ``"bfloat16"``,
            ``"float32"``... Adapter weights are always float32.
        lora_compute_dtype: the dtype the trained weights compute in: ``"auto"`` (the base's: bfloat16 on GPUs,
            float32 on CPU), ``"bfloat16"``, ``"float32"``. The weights themselves, their gradients, the optimizer's
            moments, checkpoints and exports stay float32 (master weights); ``float32`` with a bf16 base is the
            slower path of peft's default (every adapted layer's input copied to float32). With full fine-tuning the
            network computes under autocast to it.
        local_files_only: never contact the Hub (offline clusters with a pre-filled cache).
        revision: Hub revision (branch, tag or commit) for reproducibility.
        text_encoders: load the text encoders (and keep the VAE encoder). ``false`` skips them and requires shards
            converted with ``divrl data ... --precompute MODEL``.
        train_transformer: full fine-tuning instead of LoRA (set ``lora: null``): every weight of the network trains in
            float32. With a KL term the reference is a frozen copy of the initial network that does not double GPU
            memory: sharded like the policy under FSDP2, else kept on the CPU and streamed block by block.
        gradient_checkpointing: activation checkpointing of the network's blocks: ``none``; ``full`` keeps each
            block's input only and recomputes the block in the backward pass (least memory, about 1.4x slower per
            micro-batch); ``selective`` keeps the matmul and attention outputs and recomputes the elementwise work
            (norms, modulation, activations, RoPE) in between. ``true`` / ``false`` mean ``full`` / ``none``.
        compile: compile each repeated block with ``torch.compile`` (regional compilation: identical blocks share a
            graph; compiled on the first rollout and the first update, logged as ``perf/compile_s``). Composes with
            DDP, FSDP1, FSDP2 and checkpointing. The compiled graphs round to the low precision where eager code
            does, so the rollout (no-grad) and the training graph agree: measured max |r − 1| = 0 on CPU for the bf16
            tiny model (8e-5 without that rounding) and for the float32 demo under DDP, FSDP1 and FSDP2; velocities
            within one bf16 ulp of eager code.
        compile_mode: ``torch.compile``'s ``mode`` (``null``: its default). ``max-autotune`` picks kernels by timing
            them, so a resumed run may pick others: resume is then no longer bit-exact.
        compile_backend: ``torch.compile``'s ``backend``: ``inductor`` (generated kernels: the speed); ``aot_eager``
            traces the same graphs without generating code (to tell a compiler problem from a model one).
        attention_backend: diffusers' attention backend for every attention layer (``native`` = PyTorch SDPA,
            restricted to ``sdpa_backends``; ``flash`` needs flash-attn 2, ``_flash_3`` flash-attn 3 (Hopper),
            ``sage``...; see ``diffusers.models.attention_dispatch.AttentionBackendName``); ``null`` keeps
            diffusers' default (SDPA). The same kernel runs rollouts and updates.
        tf32: let float32 matmuls that remain on CUDA (e.g. with ``lora_compute_dtype: float32``) use TF32 tensor
            cores (as the published run); CPU numerics are untouched.
        sdpa_backends: the attention kernels PyTorch may use (``flash``, ``efficient``, ``cudnn``, ``math``), for
            rollouts and updates alike. cuDNN is left out by default (:data:`DEFAULT_SDPA_BACKENDS`); ``null`` lets
            PyTorch choose.
    """

    model: str = ""
    lora: L.LoRAConfig | None = field(default_factory=L.LoRAConfig)
    torch_dtype: str = "auto"
    local_files_only: bool = False
    revision: str | None = None
    text_encoders: bool = True
    train_transformer: bool = False
    lora_compute_dtype: str = "auto"
    gradient_checkpointing: Literal["none", "full", "selective"] | bool = "none"
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    sdpa_backends: list[str] | None = field(default_factory=lambda: list(DEFAULT_SDPA_BACKENDS))
    attention_backend: str | None = None
    tf32: bool = True

    def __post_init__(self) -> None:
        sdpa_context(self.sdpa_backends)  # refuse unknown kernels when the configuration is read
        if isinstance(self.gradient_checkpointing, bool):  # the former switch
            self.gradient_checkpointing = "full" if self.gradient_checkpointing else "none"
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"policy.gradient_checkpointing: {self.gradient_checkpointing!r} is not one of {list(CHECKPOINTING)}"
            )
        if self.lora_compute_dtype != "auto":
            parse_dtype(self.lora_compute_dtype, "policy.lora_compute_dtype (or 'auto')")
        check_attention_backend(self.attention_backend)
        if self.train_transformer and self.lora is not None:
            raise ValueError("policy: train_transformer (full fine-tuning) needs lora: null")

    diffusers_pipeline: ClassVar[str] = ""
    """The family's diffusers pipeline class (``FluxKontextPipeline``): what ``divrl export``'s model card loads."""

    family_tag: ClassVar[str] = ""
    """The family's tag on the Hub (``flux.1-kontext``)."""

    hub_licenses: ClassVar[dict[str, dict[str, str]]] = {}
    """The licences of the family's published bases (lower-case Hub id → the card's ``license`` fields), as their Hub
    cards state them: ``divrl export``'s card uses them when the base's own card cannot be read."""

    pipeline_max_references: ClassVar[int | None] = None
    """How many reference images :attr:`diffusers_pipeline` takes (``None``: a list of any length); the card of a run
    with more sends its readers to ``divrl sample``."""

    pipeline_match: ClassVar[str] = ""
    """How closely the card's snippet reproduces ``divrl sample`` when nothing differs (appended to "This reproduces
    the first sample above"); empty: pixel for pixel."""

    def pipeline_call(self, height: int, width: int, num_steps: int) -> dict[str, object]:
        """The keyword arguments of :attr:`diffusers_pipeline`'s call that sample as divrl's deterministic sampler does
        (``noise_level: 0``) at ``height`` × ``width`` in ``num_steps`` steps, besides ``image``, ``prompt`` and
        ``generator``: the model card's snippet (``divrl export``), which reproduces ``divrl sample``."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its diffusers pipeline samples")

    def pipeline_reference(self, height: int, width: int) -> str | None:
        """Python lines that turn ``reference`` (a PIL image) into what the pipeline must be given to see it as divrl's
        sampler does, or ``None`` when the pipeline's own preprocessing already does (the model card's snippet)."""
        return None

    def pipeline_differences(self, height: int, width: int) -> list[str]:
        """Settings of this config that the stock diffusers pipeline does not reproduce at ``height`` × ``width``
        (the card says so)."""
        return []

    def load(self) -> Policy:
        """Load (or build) the family's policy from these settings (without the steps of :meth:`build`)."""
        raise NotImplementedError(
            f"{type(self).__name__} names no model family; use a family's config, e.g. divrl.policy.KontextConfig"
        )

    def build(self) -> Policy:
        """The policy, ready to train: loaded, with its attention kernels, checkpointing, compilation and TF32, and
        without the encoders, as configured."""
        policy = self.load()
        policy.sdpa_backends = None if self.sdpa_backends is None else list(self.sdpa_backends)
        set_attention_backend(policy.network, self.attention_backend)
        checkpointing = self.gradient_checkpointing  # a bool set after construction still means full / none
        checkpointing = {True: "full", False: "none"}.get(checkpointing, checkpointing)
        configure_units(
            policy.shard_units(), checkpointing, self.compile, self.compile_mode, backend=self.compile_backend
        )
        if self.tf32 and torch.cuda.is_available():
            enable_tf32()
        return policy if self.text_encoders else policy.drop_encoders()

    @property
    def compute_dtype(self) -> str | None:
        """:attr:`lora_compute_dtype` for a family's constructor (``None``: the base's dtype)."""
        return None if self.lora_compute_dtype == "auto" else self.lora_compute_dtype

    def attention(self) -> contextlib.AbstractContextManager:
        """See :meth:`Policy.attention` (for code that holds the configuration, not the policy)."""
        return sdpa_context(self.sdpa_backends)

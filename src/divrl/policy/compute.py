"""How a policy's network computes, generic over diffusers transformers: the speed levers of a training run.

Each lever applies to rollouts (no gradients) and updates (gradients) alike, so both phases run one compute path and
the first update's on-policy ratio stays exactly 1 (``tests/test_speed.py`` checks each lever).

- :func:`cast_lora_compute`: the LoRA adapter computes in the base's dtype (bf16 on GPUs) while its weights, their
  gradients and the optimizer state stay float32 (the *master* weights). Each adapter matmul casts its weight to the
  compute dtype on the fly (a differentiable cast: the gradient reaches the float32 weight in float32); peft would
  otherwise cast every adapted layer's input to float32 and run both adapter matmuls without bf16 tensor cores. A
  diffusers pipeline that loads the exported file into a bf16 transformer rounds the weights to bf16 once and runs the
  same matmuls.
- :func:`configure_units`: per repeated block, activation checkpointing, ``full`` (keep only each block's inputs) or
  ``selective`` (keep the outputs of the matmuls and of attention, recompute the cheap elementwise work: PyTorch's
  selective activation checkpointing), and regional compilation: each block's ``forward`` is compiled (identical
  blocks share one compiled graph), outside the hooks of FSDP, so it composes with DDP, FSDP1 and FSDP2.
- :func:`autocast_forward`: the same for full fine-tuning: float32 weights, matmuls under autocast.
- :func:`set_attention_backend` and :func:`enable_tf32`: diffusers' attention backend, and TF32 for any float32
  matmul left on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CHECKPOINTING",
    "LoRAComputeLinear",
    "cast_lora_compute",
    "configure_units",
    "unit_runner",
    "UnitForward",
    "selective_checkpoint_policy",
    "autocast_forward",
    "set_attention_backend",
    "check_attention_backend",
    "enable_tf32",
    "compile_seconds",
    "SAVED_OPS",
    "is_attention_op",
    "prepare_weights",
]

CHECKPOINTING = ("none", "full", "selective")
"""The activation checkpointing modes of ``policy.gradient_checkpointing``."""


class LoRAComputeLinear(nn.Linear):
    """A LoRA factor (``lora_A`` / ``lora_B``) whose float32 weight computes in ``compute_dtype``: the input and a
    cast of the weight meet in one matmul of that dtype; the weight's gradient arrives in float32."""

    compute_dtype: torch.dtype

    @classmethod
    def wrap(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> LoRAComputeLinear:
        """The same parameters (shared, not copied) computing in ``compute_dtype``."""
        module = _sharing(cls, linear)
        module.compute_dtype = compute_dtype
        return module

    def linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` over the same parameters (peft's float32 path)."""
        return _sharing(nn.Linear, self)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"


def _sharing(cls: type[nn.Linear], linear: nn.Linear) -> nn.Linear:
    module = cls.__new__(cls)  # no new weights: the parameters are linear's own
    nn.Module.__init__(module)
    module.in_features, module.out_features = linear.in_features, linear.out_features
    module.weight, module.bias = linear.weight, linear.bias
    return module


def cast_lora_compute(network: nn.Module, dtype: torch.dtype) -> int:
    """Make every peft LoRA layer of ``network`` compute its adapter in ``dtype`` with its float32 weights (see the
    module docstring); float32 restores peft's own path. Returns the number of adapted layers."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in network.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = dtype == torch.float32  # peft casts the input to the adapter's float32
        for factors in (layer.lora_A, layer.lora_B):
            for name, factor in list(factors.items()):
                if not isinstance(factor, nn.Linear):
                    raise TypeError(
                        f"cast_lora_compute: {type(factor).__name__} adapters are not supported (nn.Linear)"
                    )
                linear = factor.linear() if isinstance(factor, LoRAComputeLinear) else factor
                factors[name] = linear if dtype == torch.float32 else LoRAComputeLinear.wrap(linear, dtype)
    return len(layers)


SAVED_OPS = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)
"""The ``aten`` ops whose outputs selective checkpointing keeps (matmuls and attention kernels); everything else in
a block (norms, modulation, activations, RoPE, residual sums) is recomputed in the backward pass."""


ATTENTION_OPS = ("flash_attn", "attention", "sageattn")
"""Name fragments of the custom attention ops diffusers' backends call (flash-attn 2: ``flash_attn::``, flash-attn 3:
``_diffusers_flash_attn_3::_flash_attn_forward``, SageAttention...): selective checkpointing keeps their outputs too."""


def is_attention_op(op) -> bool:
    """Whether ``op`` (an ``OpOverload``) is a custom attention kernel (see :data:`ATTENTION_OPS`)."""
    name = op.name() if hasattr(op, "name") else str(op)
    return "::" in name and not name.startswith("aten::") and any(part in name for part in ATTENTION_OPS)


def selective_checkpoint_policy(saved: Sequence[str] = SAVED_OPS) -> Callable:
    """The ``context_fn`` of :func:`torch.utils.checkpoint.checkpoint` that keeps the outputs of the ``saved`` ops."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    ops = {getattr(torch.ops.aten, name).default for name in saved if hasattr(torch.ops.aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops or is_attention_op(op) else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


class UnitForward:
    """The ``forward`` of a unit under :func:`configure_units`: the class's own forward, run through activation
    checkpointing (with gradients enabled) and ``torch.compile`` as configured.

    It is an instance attribute of the unit that names the unit, so a deep copy of the network (full fine-tuning's
    frozen reference) gets forwards bound to the copied units, with the same (shared) compiled code.
    """

    def __init__(self, unit: nn.Module, run: Callable):
        # The class's forward, looked up here: inside the compiled region ``type(unit).forward`` is a lookup dynamo
        # cannot trace for diffusers' blocks (``maybe_allow_in_graph``), a graph break that would leave everything
        # under the checkpoint, i.e. all of training, eager.
        self.unit, self.run, self.forward = unit, run, type(unit).forward

    def __call__(self, *args, **kwargs):
        return self.run(self.forward, self.unit, *args, **kwargs)


@functools.cache
def unit_runner(checkpointing: str, compile: bool, mode: str | None = None, backend: str = "inductor") -> Callable:
    """``run(forward, unit, *args, **kwargs)``: ``forward(unit, ...)`` with ``checkpointing`` (``none``, ``full``,
    ``selective``), compiled by ``backend`` or not; one function per setting, so identical blocks share one graph."""
    from torch.utils.checkpoint import checkpoint

    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"policy.gradient_checkpointing: {checkpointing!r} is not one of {list(CHECKPOINTING)}")
    context = {"context_fn": selective_checkpoint_policy()} if checkpointing == "selective" else {}

    def run(forward, unit, *args, **kwargs):
        if checkpointing == "none" or not torch.is_grad_enabled():  # rollouts keep nothing for a backward pass
            return forward(unit, *args, **kwargs)
        return checkpoint(forward, unit, *args, use_reentrant=False, **context, **kwargs)

    if not compile:
        return run
    if backend != "inductor":  # e.g. aot_eager: tracing without code generation (debugging, fast tests)
        return torch.compile(run, dynamic=False, backend=backend)
    from torch._inductor import list_mode_options

    # Round to the low precision where eager code would: without it the no-grad (rollout) and the training graph fuse
    # differently and round at different points (bf16 tiny model, CPU: max |r - 1| 8e-5 on the first update; with
    # it, 0).
    options = {**list_mode_options(mode or "default"), "emulate_precision_casts": True}
    return torch.compile(run, dynamic=False, options=options)


def configure_units(
    units: Sequence[nn.Module],
    checkpointing: str = "none",
    compile: bool = False,
    mode: str | None = None,
    recompile_limit: int = 64,
    backend: str = "inductor",
) -> None:
    """Give each unit (a repeated block) activation checkpointing and regional compilation.

    ``checkpointing``: ``full`` keeps each block's inputs only and recomputes the block in the backward pass;
    ``selective`` also keeps the outputs of the matmuls and attention (:data:`SAVED_OPS`) and recomputes the rest;
    ``none`` keeps everything. Without gradients (rollouts) nothing is checkpointed.

    ``compile``: the block's ``forward`` (checkpoint included, the only way selective checkpointing composes with
    ``torch.compile``) is compiled by ``backend`` with static shapes and ``mode`` (torch's; default none:
    ``max-autotune`` chooses kernels by timing, which breaks bit-exact resume). Training is compiled as much as
    rollouts: no graph break (``tests/test_speed.py`` checks). Only ``forward`` is compiled, not the module call, so the hooks
    of FSDP1 and FSDP2 (all-gathers) stay eager around it, in any order of sharding and compiling. Blocks of one type
    share a graph per input shape and grad mode (rollout and training micro-batches, adapter on and off):
    ``recompile_limit`` leaves room for every variant; past it PyTorch would run eager code, and the rollout and the
    update would no longer share kernels.
    """
    if checkpointing == "none" and not compile:
        unit_runner(checkpointing, compile, mode, backend)  # validates
        for unit in units:  # the class's own forward again
            if isinstance(unit.__dict__.get("forward"), UnitForward):
                del unit.forward
        return
    if compile:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    run = unit_runner(checkpointing, compile, mode, backend)
    for unit in units:
        unit.forward = UnitForward(unit, run)


class AutocastForward:
    """The ``forward`` of a network under :func:`autocast_forward` (an instance attribute naming the network, so a
    deep copy, full fine-tuning's frozen reference, computes the same way)."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        self.network, self.dtype = network, dtype

    def __call__(self, *args, **kwargs):
        tensor = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        device = tensor.device if tensor is not None else next(self.network.parameters()).device
        with torch.autocast(device.type, dtype=self.dtype):
            return type(self.network).forward(self.network, *args, **kwargs)


def autocast_forward(network: nn.Module, dtype: torch.dtype) -> None:
    """Full fine-tuning's mixed precision: the network's float32 weights (the master weights the optimizer updates)
    compute under ``torch.autocast(dtype)``: matmuls and attention in ``dtype``, norms and softmax in float32, weight
    gradients in float32. Only the network's calls run under it (not the VAE or the rewards); a no-op for float32."""
    if dtype != torch.float32:
        network.forward = AutocastForward(network, dtype)


def compile_seconds() -> float:
    """Seconds spent compiling in this process so far (``torch.compile``'s own count)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def check_attention_backend(backend: str | None) -> None:
    """Refuse a name that is not one of diffusers' attention backends, listing them."""
    if backend is None:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName]
    if backend not in names:
        raise ValueError(f"policy.attention_backend: {backend!r} is not a diffusers attention backend; one of {names}")


def set_attention_backend(network: nn.Module, backend: str | None) -> None:
    """Use diffusers' attention ``backend`` (``native`` = PyTorch SDPA, ``flash``, ``_flash_3``, ``sage``...) in
    every attention layer of ``network``, for rollouts and updates alike; ``None`` keeps diffusers' default (SDPA)."""
    if backend is None:
        return
    check_attention_backend(backend)
    if not hasattr(network, "set_attention_backend"):
        raise ValueError(f"policy.attention_backend: {type(network).__name__} has no set_attention_backend (diffusers)")
    network.set_attention_backend(backend)


def enable_tf32() -> None:
    """Let float32 matmuls on CUDA use TF32 tensor cores (cuDNN convolutions do by default). Through the legacy API:
    setting only the per-backend ``fp32_precision`` would leave ``torch.get_float32_matmul_precision()``, which
    inductor's autotuning reads, raising on the mix of APIs. Called only where CUDA is available."""
    torch.set_float32_matmul_precision("high")


def prepare_weights(
    policy, modules, *, lora, base_dtype, lora_compute_dtype, train_transformer: bool, who: str
) -> None:
    """A family's weights set up as every family trains them: ``modules`` (the network first, then the encoders and
    the VAE) frozen in eval mode and cast to ``base_dtype``; ``policy.compute_dtype`` from ``lora_compute_dtype``
    (default: the base's, ``policy.dtype``); then either full fine-tuning (float32 master weights of the network under
    autocast to the compute dtype; float16 refused: it would need a gradient scaler) or ``lora``'s adapter.
    ``who`` names the family in errors."""
    from divrl.policy import lora as L
    from divrl.utils import parse_dtype

    network = modules[0]
    for module in modules:
        module.requires_grad_(False)
        module.eval()
    dtype = parse_dtype(base_dtype, who)
    if dtype is not None:
        for module in modules:
            module.to(dtype)
    policy.compute_dtype = parse_dtype(lora_compute_dtype, "lora_compute_dtype") or policy.dtype
    if train_transformer:
        if lora is not None:
            raise ValueError(f"{who}: train_transformer (full fine-tuning) needs lora=None")
        if policy.compute_dtype == torch.float16:
            raise ValueError(
                f"{who}: full fine-tuning under float16 autocast would need a gradient scaler; use "
                f"lora_compute_dtype bfloat16 (or float32)"
            )
        network.float().requires_grad_(True)  # float32 master weights
        autocast_forward(network, policy.compute_dtype)  # compute_dtype matmuls
    policy.train_transformer = train_transformer
    policy.lora_config = lora
    if lora is not None:
        L.add_adapter(network, lora, policy.compute_dtype)

"""The speed levers of ``divrl.policy.compute`` keep the method exact: LoRA compute in bf16 with float32 master
weights, full fine-tuning under autocast, full and selective activation checkpointing and regional compilation each
leave the first update exactly on-policy (ratio 1), and the bf16 adapter reproduces in diffusers' pipeline.

Measured on this CPU (tiny model, bf16 base, rollouts of 4 samples, updates of 2): max |r - 1| = 0 for every lever;
with ``torch.compile`` it is 0 only because the compiled graphs round to bf16 where eager code does
(``emulate_precision_casts``): without it the no-grad and the training graph fuse differently, 8e-5. (The float32
demo compiled under DDP, FSDP1 and FSDP2, measured by hand: 0 too.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline
from test_policy import PROMPT, pipeline_latents, reference
from torch.utils._python_dispatch import TorchDispatchMode

from divrl.grpo.sampler import rollout, transition_log_prob
from divrl.policy import KontextConfig, KontextPolicy, LoRAConfig
from divrl.policy.compute import SAVED_OPS, LoRAComputeLinear, UnitForward, configure_units, is_attention_op
from divrl.policy.tiny import tiny_kontext_components

LORA = LoRAConfig(rank=4, alpha=8.0)


def moved(policy: KontextPolicy) -> KontextPolicy:
    """The adapter moved away from B = 0 (so it changes the model), the same for every policy built from one seed."""
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return policy


def first_update_ratio(policy: KontextPolicy, rollout_micro: int = 4, train_micro: int = 2) -> tuple[float, list]:
    """Max |r - 1| over every (micro-batch, step) of a first update, and the float32 gradients it accumulates."""
    cond = policy.condition(reference(32, 32), PROMPT, 32, 32, group_size=4)
    with policy.attention():
        traj = rollout(
            policy,
            cond,
            num_steps=3,
            noise_level=0.9,
            generator=torch.Generator().manual_seed(0),
            micro_batch_size=rollout_micro,
            decode=False,
        )
        deviation = 0.0
        for step in range(3):
            for index in torch.arange(4).split(train_micro):
                out = transition_log_prob(policy, traj, step, cond, index)
                deviation = max(deviation, (out.log_prob - traj.log_probs[index, step]).exp().sub(1).abs().max().item())
                out.log_prob.sum().backward()
    return deviation, [p.grad for p in policy.trainable_parameters()]


def test_a_bf16_adapter_computes_in_bf16_from_float32_master_weights():
    policy = KontextPolicy.tiny(0, lora=LORA, base_dtype="bfloat16")  # lora_compute_dtype: the base's
    assert policy.compute_dtype == torch.bfloat16
    layer = policy.transformer.transformer_blocks[0].attn.to_q
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert isinstance(a, LoRAComputeLinear) and a.weight.dtype == b.weight.dtype == torch.float32
    moved(policy)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = layer(x)
    # by hand: the bf16 base, plus both adapter matmuls in bf16 with the weights rounded to bf16
    expected = layer.base_layer(x) + F.linear(F.linear(x, a.weight.bfloat16()), b.weight.bfloat16()) * 2.0
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.float().sum().backward()
    assert a.weight.grad.dtype == torch.float32 and a.weight.grad.abs().sum() > 0
    # the file on disk stays float32 (the master weights)
    assert all(v.dtype == torch.float32 for v in policy.lora_state_dict().values())
    # float32 compute keeps peft's own path (inputs cast to the float32 adapter)
    plain = KontextPolicy.tiny(0, lora=LORA, base_dtype="bfloat16", lora_compute_dtype="float32")
    assert type(plain.transformer.transformer_blocks[0].attn.to_q.lora_A["default"]) is torch.nn.Linear


@pytest.mark.parametrize(
    ("setting", "build"),
    [
        ("fp32 (the CPU default)", lambda: moved(KontextPolicy.tiny(0, lora=LORA))),
        ("bf16 base, bf16 adapter compute", lambda: moved(KontextPolicy.tiny(0, lora=LORA, base_dtype="bfloat16"))),
        (
            "fp32 base, bf16 adapter compute",
            lambda: moved(KontextPolicy.tiny(0, lora=LORA, lora_compute_dtype="bfloat16")),
        ),
        (
            "bf16 full fine-tuning under autocast",
            lambda: KontextPolicy.tiny(0, base_dtype="bfloat16", train_transformer=True),
        ),
    ],
)
def test_every_compute_dtype_keeps_the_first_update_on_policy(setting, build):
    policy = build()
    deviation, grads = first_update_ratio(policy)
    assert deviation <= 1e-6, setting  # measured: 0
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())  # master weights


def test_full_fine_tuning_computes_its_matmuls_in_bf16_and_its_reference_the_same_way():
    policy = KontextPolicy.tiny(0, base_dtype="bfloat16", train_transformer=True)
    seen = []
    policy.transformer.proj_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cond = policy.condition(reference(32, 32), PROMPT, 32, 32)
    x = policy.initial_noise(cond, torch.Generator().manual_seed(0))
    v = policy.velocity(x, 0.5, cond)
    assert seen == [torch.bfloat16] and policy.transformer.proj_out.weight.dtype == torch.float32
    policy.keep_reference()
    with torch.no_grad():
        policy.transformer.proj_out.weight.add_(0.1)
    with policy.reference_policy():
        assert torch.equal(policy.velocity(x, 0.5, cond), v)  # the frozen copy: initial weights, same compute


def backward_ops(policy: KontextPolicy) -> dict[str, int]:
    """How often the backward pass of one training forward runs each ``aten`` op (recomputation shows up here)."""
    cond = policy.condition(reference(32, 32), PROMPT, 32, 32, group_size=2)
    x = policy.initial_noise(cond, torch.Generator().manual_seed(0))
    loss = policy.velocity(x, 0.5, cond).float().sum()
    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):  # below checkpointing's own mode: sees the ops really run, not cached outputs
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        loss.backward()
    return counts


def test_checkpointing_recomputes_what_it_should_and_computes_the_same_gradients():
    grads, ops = {}, {}
    for mode in ("none", "selective", "full"):
        policy = moved(KontextPolicy.tiny(0, lora=LORA, base_dtype="bfloat16"))
        configure_units(policy.shard_units(), mode)
        deviation, grads[mode] = first_update_ratio(policy)
        assert deviation <= 1e-6, mode
        ops[mode] = backward_ops(policy)
    for mode in ("selective", "full"):
        assert all(torch.equal(a, b) for a, b in zip(grads[mode], grads["none"])), mode  # recomputation is exact

    def count(mode, *names):
        return sum(ops[mode].get(n, 0) for n in names)

    matmuls, attention = ("mm", "addmm"), ("_scaled_dot_product_flash_attention_for_cpu",)
    # none recomputes nothing; full recomputes every block: its matmuls, attention and elementwise work (GELU)
    assert count("none", "gelu") == 0 and count("none", *attention) == 0
    assert count("full", *matmuls) > count("none", *matmuls) and count("full", *attention) > 0
    assert count("full", "gelu") > 0
    # selective keeps the matmul and attention outputs (no matmul or attention runs again) and recomputes the rest
    assert count("selective", *matmuls) == count("none", *matmuls) and count("selective", *attention) == 0
    assert count("selective", "gelu") == count("full", "gelu")
    assert {"mm", "addmm", *attention} <= set(SAVED_OPS)


def test_checkpointing_and_compilation_settings_are_validated():
    assert KontextConfig(model="tiny", gradient_checkpointing=True).gradient_checkpointing == "full"  # the former bool
    assert KontextConfig(model="tiny", gradient_checkpointing=False).gradient_checkpointing == "none"
    with pytest.raises(ValueError, match="gradient_checkpointing: 'some' is not one of"):
        KontextConfig(model="tiny", gradient_checkpointing="some")
    with pytest.raises(ValueError, match="lora_compute_dtype"):
        KontextConfig(model="tiny", lora_compute_dtype="int8")
    with pytest.raises(ValueError, match="attention_backend: 'flashy' is not a diffusers attention backend"):
        KontextConfig(model="tiny", attention_backend="flashy")  # refused when read, before any model loads
    with pytest.raises(ValueError, match="float16 autocast would need a gradient scaler"):
        KontextPolicy.tiny(0, train_transformer=True, lora_compute_dtype="float16")


def test_selective_checkpointing_keeps_the_outputs_of_custom_attention_kernels():
    """diffusers' flash-attn backends call custom ops, not aten's SDPA: their outputs are kept too."""

    @torch.library.custom_op("divrl_test::flash_attn_forward", mutates_args=())
    def fake_flash(q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    assert is_attention_op(torch.ops.divrl_test.flash_attn_forward.default)
    assert not is_attention_op(torch.ops.aten.mul.Tensor) and not is_attention_op(torch.ops.aten.gelu.default)


def test_a_chosen_attention_backend_runs_both_phases_and_matches_sdpa():
    config = KontextConfig(model="tiny", lora=LORA, attention_backend="_native_math", gradient_checkpointing="full")
    policy = moved(config.build())
    assert isinstance(policy.transformer.transformer_blocks[0].forward, UnitForward)
    deviation, _ = first_update_ratio(policy)
    assert deviation <= 1e-6
    default = moved(KontextConfig(model="tiny", lora=LORA).build())
    cond = default.condition(reference(32, 32), PROMPT, 32, 32)
    x = default.initial_noise(cond, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, 0.5, cond), default.velocity(x, 0.5, cond), atol=1e-5, rtol=0)


def test_the_bf16_adapter_loads_in_diffusers_and_reproduces_the_bf16_sampler(tmp_path):
    policy = moved(KontextPolicy.tiny(seed=1, lora=LORA, base_dtype="bfloat16"))
    policy.save_lora(tmp_path / "lora")
    pipe = FluxKontextPipeline(**tiny_kontext_components(seed=1)).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")  # diffusers rounds the float32 file to the bf16 transformer's dtype
    condition = policy.condition(reference(32, 32), PROMPT, 32, 32)
    x = policy.initial_noise(condition, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = policy.velocity(x, 0.5, condition)
        trained, policy.transformer = policy.transformer, pipe.transformer
        theirs = policy.velocity(x, 0.5, condition)  # diffusers' transformer with the loaded file
        policy.transformer = trained
    assert torch.equal(ours, theirs)  # the same bf16 matmuls, bit for bit
    # end to end, the bf16 pipeline and our sampler differ by rounding in their step arithmetic (also without an
    # adapter): within one bf16 ulp of the largest latent, far below what the adapter changes
    expected = pipeline_latents(pipe, reference(32, 32), PROMPT, 32, 32, steps=3, seed=0, group=1).float()
    traj = rollout(
        policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(0), decode=False
    )
    with policy.adapter_disabled():
        base = rollout(
            policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(0), decode=False
        )
    ulp = 2**-7 * expected.abs().max()
    assert (traj.latents[:, -1].float() - expected).abs().max() <= ulp
    assert (base.latents[:, -1].float() - expected).abs().max() > 4 * ulp


def compiled_nodes(loss: torch.Tensor) -> set[str]:
    """The names of the compiled (AOTAutograd) nodes in ``loss``'s backward graph."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__) if "Compiled" in type(node).__name__ else None
        stack += [next_fn for next_fn, _ in node.next_functions]
    return names


@pytest.mark.slow
def test_compiled_blocks_stay_on_policy_and_match_eager():
    """bf16 base and adapter compute, selective checkpointing, compiled blocks (~60 s cold on two cores). The
    training forward is compiled as the rollouts are: no graph break (a break at the checkpoint once left all of
    training eager)."""
    from torch._dynamo.utils import counters

    eager = moved(KontextPolicy.tiny(0, lora=LORA, base_dtype="bfloat16"))
    compiled = copy.deepcopy(eager)
    configure_units(compiled.shard_units(), "selective", compile=True)
    counters.clear()
    deviation, grads = first_update_ratio(compiled)
    assert deviation <= 1e-6  # measured: 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    # batches of 2, the training micro-batch's shape: the graphs compiled above serve (no compilation for new shapes)
    cond = compiled.condition(reference(32, 32), PROMPT, 32, 32, group_size=2)
    x = compiled.initial_noise(cond, torch.Generator().manual_seed(0))
    assert compiled_nodes(compiled.velocity(x, 0.5, cond).float().sum())  # training runs compiled code
    _, eager_grads = first_update_ratio(eager)
    for g, e in zip(grads, eager_grads):  # bf16 rounding points differ from eager's by an ulp here and there
        torch.testing.assert_close(g, e, atol=1e-2 * e.abs().max().item(), rtol=0)
    with torch.no_grad():
        v, w = eager.velocity(x, 0.5, cond).float(), compiled.velocity(x, 0.5, cond).float()
    assert (v - w).abs().max() <= 2**-7 * v.abs().max()  # within one bf16 ulp of the largest value

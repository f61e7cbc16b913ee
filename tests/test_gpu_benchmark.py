"""The GPU step benchmark runs its smoke configuration on CPU, and its analytic FLOP count matches the matmuls the
FLUX blocks really perform (counted with forward hooks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from divrl.policy.flops import transformer_flops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_analytic_flops_match_the_block_matmuls():
    bench = load()
    policy, config = bench.build_policy(True, "cpu", torch.float32, lora_rank=4)
    transformer = policy.transformer
    counted = []

    def hook(module, inputs, output):
        x = inputs[0]
        counted.append(2 * x.numel() // module.in_features * module.in_features * module.out_features)

    for name, module in transformer.named_modules():
        in_block = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if in_block and isinstance(module, nn.Linear) and "norm" not in name and "lora_" not in name:
            module.register_forward_hook(hook)
    res, text = 64, 8
    tokens = policy.num_image_tokens(res, res)
    condition = policy.condition_from_precomputed(
        torch.randn(1, text, 32), torch.randn(1, 16), torch.randn(1, tokens, 64), res, res
    )
    with torch.no_grad(), policy.adapter_disabled():
        policy.velocity(torch.randn(1, tokens, 64), 0.5, condition)
    h = config["attention_head_dim"] * config["num_attention_heads"]
    total = 2 * tokens + text
    attention = (config["num_layers"] + config["num_single_layers"]) * 4 * total * total * h
    assert sum(counted) + attention == transformer_flops(config, tokens, tokens, text)


def test_smoke_run_reports_every_figure():
    results = load().main(["--smoke", "--device", "cpu"])
    for key in (
        "rollout_step_s",
        "train_microbatch_timestep_s",
        "update_s",
        "trajectory_group_s",
        "rollout_mfu",
        "train_mfu",
    ):
        assert results[key] > 0, key
    assert results["trajectory_group_s"] == results["rollout_s"] + results["update_s"]


def test_compare_runs_each_lever_on_one_model_and_every_setting_is_on_policy(capsys):
    bench = load()
    names = ["today", "lora-bf16", "selective", "no-checkpointing"]
    results = bench.main(["--smoke", "--device", "cpu", "--compare", *names])
    assert list(results) == names
    assert results["today"]["lora_compute_dtype"] == "float32" and results["today"]["gradient_checkpointing"] == "full"
    assert results["lora-bf16"]["lora_compute_dtype"] == "bfloat16"
    for name, row in results.items():
        assert row["max_ratio_dev"] <= 1e-6, name
        assert row["trajectory_s"] == pytest.approx(row["trajectory_group_s"] / 4)
    table = capsys.readouterr().out.splitlines()
    assert any(line.startswith("setting") and "s/trajectory" in line and "max|r-1|" in line for line in table)
    assert {line.split()[0] for line in table if line.split()} >= set(names)
    assert set(bench.comparison("cpu")) >= {"today", "lora-bf16", "compile", "selective", "tf32", "all"}
    with pytest.raises(SystemExit, match="unknown settings"):
        bench.main(["--smoke", "--device", "cpu", "--compare", "fastest"])


def test_the_full_size_benchmark_refuses_to_run_on_a_cpu_unless_told(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        load().parse([])
    assert exit_.value.code == 2 and "--smoke" in capsys.readouterr().err
    assert load().parse(["--device", "cpu"]).device == "cpu"


def test_memory_model_counts_match_peft_and_a_hand_computed_case():
    spec = importlib.util.spec_from_file_location("memory_model", SCRIPT.with_name("memory_model.py"))
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    from divrl.policy import KontextPolicy, LoRAConfig

    policy = KontextPolicy.tiny(lora=LoRAConfig(rank=4, alpha=8))
    config = {k: v for k, v in policy.transformer.config.items() if not k.startswith("_")}
    total, lora = model.parameter_counts(4, config)
    assert lora == sum(p.numel() for p in policy.trainable_parameters())
    assert total + lora == sum(p.numel() for p in policy.transformer.parameters())
    # LoRA under DDP, fp32 AdamW, precomputed conditions: bf16 base + 16 B per trainable weight + the bf16 VAE
    assert (
        model.per_gpu_bytes(
            1000, 10, 8, full=False, strategy="ddp", eightbit=False, text_encoders=False, reference_copy=False
        )
        == 2000 + 160 + 2 * model.VAE_PARAMS
    )
    # LoRA under FSDP1 over 4 GPUs: the base sharded, the adapter and its states whole; FSDP2 shards them too
    assert (
        model.per_gpu_bytes(
            1000, 10, 4, full=False, strategy="fsdp1", eightbit=False, text_encoders=False, reference_copy=False
        )
        == 2000 / 4 + 160 + 2 * model.VAE_PARAMS
    )
    assert (
        model.per_gpu_bytes(
            1000, 10, 4, full=False, strategy="fsdp2", eightbit=False, text_encoders=False, reference_copy=False
        )
        == (2000 + 160) / 4 + 2 * model.VAE_PARAMS
    )
    # full fine-tuning, FSDP2 over 4 GPUs, 8-bit states: (4 + 4 + 2) B per parameter, sharded
    assert (
        model.per_gpu_bytes(
            1000, 1000, 4, full=True, strategy="fsdp2", eightbit=True, text_encoders=False, reference_copy=False
        )
        == 10_000 / 4 + 2 * model.VAE_PARAMS
    )
    with pytest.raises(ValueError, match="full fine-tuning: ddp or fsdp2"):
        model.per_gpu_bytes(
            1000, 1000, 4, full=True, strategy="fsdp1", eightbit=True, text_encoders=False, reference_copy=False
        )
    # the 20B family: its LoRA count is the adapter peft builds on the tiny model with the family's default targets
    from divrl.policy.qwen_image import QwenEditPolicy

    qwen = QwenEditPolicy.tiny(lora=LoRAConfig(rank=4, alpha=8))
    config = {k: v for k, v in qwen.transformer.config.items() if not k.startswith("_")}
    total, lora = model.parameter_counts(4, config, "qwen")
    assert lora == sum(p.numel() for p in qwen.trainable_parameters())
    assert total + lora == sum(p.numel() for p in qwen.transformer.parameters())
    assert (
        model.per_gpu_bytes(
            1000,
            10,
            8,
            full=False,
            strategy="ddp",
            eightbit=False,
            text_encoders=True,
            reference_copy=False,
            text_params=7,
            vae_params=3,
        )
        == 2000 + 160 + 2 * 3 + 2 * 7
    )


def test_smoke_run_of_full_fine_tuning_trains_every_weight():
    results = load().main(["--smoke", "--device", "cpu", "--full-finetune"])
    assert results["trainable_params_m"] == results["transformer_params_b"] * 1e3
    assert results["train_microbatch_timestep_s"] > 0 and results["train_mfu"] > 0

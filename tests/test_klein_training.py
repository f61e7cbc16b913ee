"""`divrl fit` on FLUX.2 [klein]: the demo's two DivRL stages on the tiny klein (CFG on, two references per
condition from the multi-subject shards too), the LoRA it exports loaded by ``Flux2KleinPipeline``, and a run
interrupted after the stage switch resumed bit-identically."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import Flux2KleinPipeline
from safetensors.torch import load_file

from divrl.cli import main

pytestmark = (
    pytest.mark.slow
)  # a 4-update fit on the tiny klein (~50 s on 2 cores); tests/test_klein.py is the inner loop

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SWITCH = 2
KLEIN = [
    "--model.policy",
    "divrl.policy.flux2.Flux2KleinConfig",
    "--model.policy.model",
    "tiny",
    "--model.policy.max_sequence_length",
    "32",
    "--model.policy.guidance_scale",
    "3.0",
    "--model.sampling.group_size",
    "4",
    "--model.objective.init_args.micro_batch_size",
    "4",
]


def overrides(tmp_path: Path) -> Path:
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": SWITCH}},
                {"class_path": "divrl.training.LoRAExporter"},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1},
                },
            ],
        }
    }
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(tmp_path: Path, max_steps: int, *args: str) -> None:
    assert (
        main(
            [
                "fit",
                "--config",
                str(DEMO),
                "--config",
                str(overrides(tmp_path)),
                *KLEIN,
                "--trainer.max_steps",
                str(max_steps),
                "--trainer.limit_val_batches",
                "0",
                *args,
            ]
        )
        == 0
    )


def metrics(root: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as f:
            rows += [r for r in csv.DictReader(f) if r.get("reward/mean")]
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory, in_repository_root) -> Path:
    root = tmp_path_factory.mktemp("klein")
    fit(root, 4)
    return root


def test_both_stages_train_on_policy_with_guidance(trained):
    rows = metrics(trained)
    assert [float(r["train/stage"]) for r in rows] == [0, 0, 1, 1]
    assert all(float(r["train/ratio_max_dev"]) < 1e-6 for r in rows)  # the guided velocity on both paths
    assert all(float(r["train/grad_norm"]) > 0 for r in rows)
    assert all(float(r["reward/gated_fraction"]) == 0 for r in rows[:SWITCH])
    stage1 = load_file(trained / "lora/stage1/pytorch_lora_weights.safetensors")
    final = load_file(trained / "lora/final/pytorch_lora_weights.safetensors")
    assert any(".single_transformer_blocks.0.attn.to_qkv_mlp_proj." in k for k in final)
    assert any(not torch.equal(stage1[k], final[k]) for k in final)


def test_the_exported_lora_loads_in_the_pipeline(trained):
    from divrl.policy import LoRAConfig
    from divrl.policy.flux2 import Flux2KleinPolicy
    from divrl.policy.flux2.tiny import tiny_klein_components

    pipe = Flux2KleinPipeline(**tiny_klein_components(seed=0))
    pipe.load_lora_weights(trained / "lora/final")
    demo = yaml.safe_load(DEMO.read_text())["model"]["policy"]["lora"]  # the adapter the demo config trains
    policy = Flux2KleinPolicy.tiny(seed=0, guidance_scale=3.0, lora=LoRAConfig(rank=demo["rank"], alpha=demo["alpha"]))
    policy.load_lora(trained / "lora/final")
    condition = policy.condition([torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))], ["a dog"], 32, 32)
    latents = policy.initial_noise(condition, torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = torch.cat([latents, condition.image_latents], dim=1)
        timestep = torch.full((1,), 0.6)
        out = pipe.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=condition.prompt_embeds,
            txt_ids=condition.text_ids,
            img_ids=condition.img_ids,
            return_dict=False,
        )[0][:, : latents.shape[1]]
        neg = pipe.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=condition.negative_prompt_embeds,
            txt_ids=condition.text_ids,
            img_ids=condition.img_ids,
            return_dict=False,
        )[0][:, : latents.shape[1]]
        assert torch.allclose(policy.velocity(latents, 0.6, condition), neg + 3.0 * (out - neg), atol=1e-5)


def test_resume_after_the_switch_matches_the_uninterrupted_run(trained, tmp_path):
    fit(tmp_path, 3)
    fit(tmp_path, 4, "--ckpt_path", "last")
    for name in ("stage1", "final"):
        resumed = load_file(tmp_path / f"lora/{name}/pytorch_lora_weights.safetensors")
        straight = load_file(trained / f"lora/{name}/pytorch_lora_weights.safetensors")
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name
    rows = {int(r["step"]): r["reward/mean"] for r in metrics(tmp_path)}
    assert all(rows[int(r["step"])] == r["reward/mean"] for r in metrics(trained) if int(r["step"]) in rows)

"""What precomputed conditioning (``divrl data ... --precompute MODEL``) saves.

1. **Memory** of the modules a run with ``policy.text_encoders: false`` never loads, for FLUX.1 Kontext: the T5 v1.1
   XXL encoder, the CLIP ViT-L/14 text model and the VAE encoder, built from their published configurations on the
   meta device (no download). Bytes in bf16, as training holds them.
2. **Time** of building a rollout batch's conditions on the demo's tiny model: encoding every prompt and reference
   (fresh prompts, as in training where each identity brings its own) against reading them from the shard, side by
   side in one run, and the seconds per training step of the demo config on the two kinds of shards.

Usage::

    python benchmarks/precompute.py            # CPU
    python benchmarks/precompute.py --steps 20
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from divrl.policy.flops import FLUX_VAE_CONFIG as FLUX_VAE

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "data" / "demo" / "tiny-kontext"

# Published configurations (google/t5-v1_1-xxl encoder, openai/clip-vit-large-patch14 text model, FLUX.1 VAE).
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
)


def skipped_memory() -> dict[str, float]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        models = {
            "T5 v1.1 XXL encoder": T5EncoderModel(T5Config(**T5_XXL)),
            "CLIP ViT-L/14 text": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "VAE encoder (FLUX)": AutoencoderKL(**FLUX_VAE).encoder,
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def conditioning_seconds(repeats: int) -> tuple[float, float]:
    from divrl.data.converters import Precompute
    from divrl.data.synthetic import synthetic_records
    from divrl.policy import KontextPolicy

    policy = KontextPolicy.from_pretrained(DEMO_MODEL, lora=None, max_sequence_length=32)
    records = list(synthetic_records(2 * repeats, size=64, seed=7))
    stored = [Precompute(policy, 32)(r).conditioning for r in records]
    encode, read = [], []
    for i in range(repeats):
        batch = records[2 * i : 2 * i + 2]
        policy.clear_caches()
        t0 = time.perf_counter()
        policy.condition([r.reference for r in batch], [r.prompts[0] for r in batch], 32, 32, group_size=8)
        t1 = time.perf_counter()
        pre = stored[2 * i : 2 * i + 2]
        policy.condition_from_precomputed(
            torch.cat([p["prompt_embeds"][:1] for p in pre]),
            torch.cat([p["pooled_prompt_embeds"][:1] for p in pre]),
            torch.cat([p["image_latents"] for p in pre]),
            32,
            32,
            group_size=8,
        )
        t2 = time.perf_counter()
        encode.append(t1 - t0)
        read.append(t2 - t1)
    return statistics.median(encode), statistics.median(read)


def step_seconds(steps: int) -> dict[str, float]:
    from divrl.cli import main

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra, flags in (
            ("encoded at run time", [], []),
            (
                "precomputed, no text encoders",
                ["--precompute", str(DEMO_MODEL), "--precompute-resolution", "32", "--max-sequence-length", "32"],
                ["--model.policy.text_encoders", "false"],
            ),
        ):
            shards, root = Path(tmp) / label.replace(" ", "_"), Path(tmp) / ("run_" + label.replace(" ", "_"))
            main(["data", "synthetic", "--out", str(shards), "--num-identities", "24", "--resolution", "64", *extra])
            root.mkdir()
            (root / "over.yaml").write_text(
                json.dumps(
                    {
                        "trainer": {
                            "callbacks": [],
                            "enable_checkpointing": False,
                            "default_root_dir": str(root),
                            "logger": {
                                "class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(root)},
                            },
                        }
                    }
                )
            )
            main(
                [
                    "fit",
                    "--config",
                    str(ROOT / "configs/demo.yaml"),
                    "--config",
                    str(root / "over.yaml"),
                    "--model.policy.model",
                    str(DEMO_MODEL),
                    "--trainer.max_steps",
                    str(steps),
                    "--data.shards",
                    str(shards),
                    "--data.val_shards",
                    "null",
                    "--trainer.limit_val_batches",
                    "0",
                    *flags,
                ]
            )
            rows = [
                r
                for f in root.glob("lightning_logs/*/metrics.csv")
                for r in csv.DictReader(f.open())
                if r.get("time/rollout")
            ][2:]
            out[label] = statistics.median(
                float(r["time/rollout"]) + float(r["time/reward"]) + float(r["time/update"]) for r in rows
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="demo training steps per variant")
    parser.add_argument("--repeats", type=int, default=20, help="condition batches timed")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print("Modules a precomputed run does not load (FLUX.1 Kontext), parameters and bf16 bytes:")
    total = 0
    for name, count in skipped_memory().items():
        total += count * 2 / 1e9
        print(f"  {name:24s} {count / 1e9:6.3f} B params  {count * 2 / 1e9:6.2f} GB")
    print(f"  together: {total:.2f} GB of GPU memory per rank not loaded (policy.text_encoders: false)")

    encode, read = conditioning_seconds(args.repeats)
    print(
        f"\nConditions for 2 identities x G=8 on the demo model (median of {args.repeats}): encode {encode * 1e3:.1f} ms, "
        f"read precomputed {read * 1e3:.2f} ms ({encode / read:.0f}x)"
    )
    steps = step_seconds(args.steps)
    base = steps["encoded at run time"]
    for label, seconds in steps.items():
        print(f"demo training step, {label:32s} {seconds:.3f} s  ({seconds / base:.3f} of run-time encoding)")


if __name__ == "__main__":
    main()

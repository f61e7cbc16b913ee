"""Fingerprint the CPU demo end to end, to prove that a refactor changed no behaviour (same seed, same bytes).

Runs, in one output folder:

1. ``divrl fit --config configs/demo.yaml`` (both stages, 120 updates);
2. ``divrl sample`` from the final LoRA on the first held-out identities (28 deterministic steps);
3. ``divrl evaluate --config configs/eval_demo.yaml`` on the base model and the two LoRAs (a few identities),

then prints the sha256 of every artifact that carries numbers: the LoRA weights (every tensor's name, dtype, shape and
bytes, and the file's metadata with its lists sorted: peft keeps ``target_modules`` as a set, whose order in older
files varied from run to run), the sampled PNGs and their ``samples.json``, the evaluation's ``metrics.json`` and
``scores.jsonl``. Run it on the code before and after a
change and compare the two listings (``diff``): any change in the math, the data order, the seeds or the rewards
changes a hash. The hashes are those of this machine's CPU kernels; compare runs made on the same machine, with the
same ``--out`` (the evaluation records the weights' paths):

    python tools/demo_fingerprint.py --out /tmp/fingerprint > before.txt     # on the code before the change
    python tools/demo_fingerprint.py --out /tmp/fingerprint > after.txt      # after it
    diff before.txt after.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "divrl.cli", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def sha(path: Path) -> str:
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        metadata = {k: json.loads(v) if v.startswith(("{", "[")) else v for k, v in (f.metadata() or {}).items()}
    digest.update(json.dumps(_sorted(metadata), sort_keys=True).encode())
    return digest.hexdigest()


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((_sorted(v) for v in value), key=json.dumps)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (emptied first)")
    parser.add_argument("--identities", type=int, default=2, help="held-out identities to sample and evaluate")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run("fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(out))
    run(
        "sample",
        "--config",
        "configs/demo.yaml",
        "--trainer.logger",
        "false",
        "--lora",
        str(out / "lora/final"),
        "--output_dir",
        str(out / "samples"),
        "--num_identities",
        str(args.identities),
        "--num_samples",
        "2",
    )
    methods = json.dumps({"base": None, "explore": str(out / "lora/stage1"), "divrl": str(out / "lora/final")})
    run(
        "evaluate",
        "--config",
        "configs/eval_demo.yaml",
        "--methods",
        methods,
        "--output_dir",
        str(out / "eval"),
        "--num_identities",
        str(args.identities),
        "--prompts_per_identity",
        "1",
        "--num_samples",
        "2",
        "--progress",
        "false",
    )

    files = sorted(out.glob("lora/*/*.safetensors")) + sorted(out.glob("samples/**/*.png"))
    files += [out / "samples/samples.json", out / "eval/metrics.json"] + sorted(out.glob("eval/*/scores.jsonl"))
    for path in files:
        print(f"{sha(path)}  {path.relative_to(out)}")


if __name__ == "__main__":
    main()

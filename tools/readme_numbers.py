"""Regenerate the CPU demo's numbers and pictures in the README from this checkout (offline, a few minutes).

Runs, in ``--out``:

1. ``divrl validate --config configs/demo.yaml`` without weights: the base model's validation row;
2. ``divrl fit --config configs/demo.yaml`` (both stages, 120 updates), timed: validation after stage 1 (step 60)
   and stage 2 (step 120), and the training rollouts' means over steps 0–9, 50–59 and 110–119;
3. ``divrl evaluate --config configs/eval_demo.yaml`` on the base model and the two exported LoRAs: the evaluation
   table, ``frontier.png`` and one sample grid per method;

then prints the two README tables as markdown, the demo's wall time and the package versions, and with
``--write-docs`` replaces ``docs/demo_frontier.png`` and ``docs/demo_samples.png`` (the three methods' grids, one
above the other).

    python tools/readme_numbers.py --out runs/readme --write-docs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "lightning", "diffusers", "transformers", "peft", "webdataset")


def run(*args: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "divrl.cli", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard logs under ``folder``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.glob("lightning_logs/*/events.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return out


def at(series: list[tuple[int, float]], step: int) -> float:
    return next(v for s, v in series if s == step)


def mean(series: list[tuple[int, float]], first: int, last: int) -> float:
    return statistics.mean(v for s, v in series if first <= s <= last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (emptied first)")
    parser.add_argument("--write-docs", action="store_true", help="replace the README's pictures in docs/")
    args = parser.parse_args()
    out = args.out.resolve()
    marker = out / ".readme_numbers"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        sys.exit(f"readme_numbers.py: --out {out} holds files this tool did not write; pass a new or empty folder")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()

    run("validate", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(out / "base"))
    seconds = run("fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(out / "fit"))
    methods = json.dumps({"base": None, "explore": str(out / "fit/lora/stage1"), "divrl": str(out / "fit/lora/final")})
    run("evaluate", "--config", "configs/eval_demo.yaml", "--methods", methods, "--output_dir", str(out / "eval"),
        "--progress", "false")

    base, fit = scalars(out / "base"), scalars(out / "fit")
    print(f"demo fit: {seconds:.0f} s on this machine; versions: "
          + ", ".join(f"{p} {version(p)}" for p in PACKAGES) + "\n")
    print("| | val nSSM | val VSM | train nSSM | train VSM | below the gate |")
    print("| --- | --- | --- | --- | --- | --- |")
    nssm, vsm, gated = fit["reward/nssm"], fit["reward/vsm"], fit["reward/gated_fraction"]
    print(f"| base model (`divrl validate` without a checkpoint) | {base['val/nssm'][-1][1]:.3f} | "
          f"{base['val/vsm'][-1][1]:.3f} | {mean(nssm, 0, 9):.3f} (steps 0–9) | {mean(vsm, 0, 9):.3f} | — |")
    print(f"| end of stage 1 (step 60, R1 = nSSM) | {at(fit['val/nssm'], 59):.3f} | {at(fit['val/vsm'], 59):.3f} | "
          f"{mean(nssm, 50, 59):.3f} (steps 50–59) | {mean(vsm, 50, 59):.3f} | — |")
    print(f"| end of stage 2 (step 120, R2 gated at VSM 0.5) | {at(fit['val/nssm'], 119):.3f} | "
          f"{at(fit['val/vsm'], 119):.3f} | {mean(nssm, 110, 119):.3f} (steps 110–119) | {mean(vsm, 110, 119):.3f} | "
          f"{mean(gated, 110, 119):.0%} |\n")

    metrics = json.loads((out / "eval/metrics.json").read_text())["methods"]
    columns = ("vsm", "si_iou", "mtg_nssm", "sdino", "consistency_ratio", "diversity_over_consistency")
    names = {"base": "base", "explore": "explore (after stage 1)", "divrl": "divrl (after stage 2)"}
    print("| method | VSM-0.7 ↑ | si-IoU ↓ | MTG-nSSM ↑ | sDINO ↑ | consistency ratio ↑ | diversity over consistency ↑ |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, label in names.items():
        row = metrics[method]["overall"]
        cells = ["—" if row.get(c) is None else f"{row[c]:.3f}" for c in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")

    if args.write_docs:
        from PIL import Image

        shutil.copy(out / "eval/frontier.png", ROOT / "docs/demo_frontier.png")
        grids = [Image.open(out / "eval" / method / "grid.png").convert("RGB") for method in names]
        canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
        y = 0
        for grid in grids:
            canvas.paste(grid, (0, y))
            y += grid.height
        canvas.save(ROOT / "docs/demo_samples.png", optimize=True)
        print("\nwrote docs/demo_frontier.png and docs/demo_samples.png")


if __name__ == "__main__":
    main()

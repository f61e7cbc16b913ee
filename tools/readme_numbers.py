"""Regenerate the CPU demo's numbers and pictures in the README from this checkout (offline, a few minutes).

Runs, in ``--out``:

1. ``divrl validate --config configs/demo.yaml`` without weights: the base model's validation row;
2. ``divrl fit --config configs/demo.yaml`` (both stages, 120 updates), timed: validation after stage 1 (step 60)
   and stage 2 (step 120), and the training rollouts' means over steps 0–9, 50–59 and 110–119;
3. ``divrl evaluate --config configs/eval_demo.yaml`` on the base model and the two exported LoRAs: the evaluation
   table, ``frontier.png`` and one sample grid per method;

4. the same for the multi-subject demo: ``divrl validate`` and ``divrl fit --config configs/demo_multi.yaml``
   (60 updates, validation every 20), ``divrl evaluate --config configs/eval_demo_multi.yaml``;
5. the FLUX.2 [klein] demo: ``divrl validate`` and ``divrl fit --config configs/demo_klein.yaml`` (timed), the same
   table as the Kontext demo's; 6. the same for the Qwen-Image-Edit demo (``configs/demo_qwen_edit.yaml``);

then prints the README tables as markdown, the demos' wall times and the package versions, and with
``--write-docs`` replaces ``docs/demo_frontier.png``, ``docs/demo_samples.png`` (the three methods' grids, one
above the other), ``docs/demo_multi_curves.png`` and ``docs/demo_multi_samples.png``.

    python tools/readme_numbers.py --out runs/readme --write-docs
    python tools/readme_numbers.py --out runs/readme_klein --demos klein     # one demo's tables only
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
    subprocess.run(
        [sys.executable, "-m", "divrl.cli", *args],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    parser.add_argument(
        "--demos",
        default="kontext,multi,klein,qwen",
        help="comma-separated demos to run: kontext, multi, klein, qwen (default: all; --write-docs "
        "needs kontext and multi)",
    )
    args = parser.parse_args()
    demos = set(args.demos.split(","))
    if demos - {"kontext", "multi", "klein", "qwen"} or (args.write_docs and not {"kontext", "multi"} <= demos):
        parser.error(f"--demos {args.demos}: name kontext, multi, klein or qwen (--write-docs needs kontext and multi)")
    out = args.out.resolve()
    marker = out / ".readme_numbers"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        sys.exit(f"readme_numbers.py: --out {out} holds files this tool did not write; pass a new or empty folder")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()
    print("versions: " + ", ".join(f"{p} {version(p)}" for p in PACKAGES) + "\n")

    if "kontext" in demos:
        kontext_demo(out)
    if "multi" in demos:
        multi_seconds = multi_demo(out)
        print(f"\nmulti-subject demo fit: {multi_seconds:.0f} s on this machine\n")
        multi_tables(out)
    if "klein" in demos:
        seconds = two_stage_demo(out, "configs/demo_klein.yaml", "klein")
        print(f"\nFLUX.2 [klein] demo fit: {seconds:.0f} s on this machine\n")
        two_stage_table(out, "klein")
    if "qwen" in demos:
        seconds = two_stage_demo(out, "configs/demo_qwen_edit.yaml", "qwen")
        print(f"\nQwen-Image-Edit demo fit: {seconds:.0f} s on this machine\n")
        two_stage_table(out, "qwen")

    if args.write_docs:
        names = ("base", "explore", "divrl")
        shutil.copy(out / "eval/frontier.png", ROOT / "docs/demo_frontier.png")
        stack([out / "eval" / method / "grid.png" for method in names], ROOT / "docs/demo_samples.png")
        stack(
            [out / "eval_multi" / method / "grid.png" for method in ("base", "divrl")],
            ROOT / "docs/demo_multi_samples.png",
        )
        multi_curves(out, ROOT / "docs/demo_multi_curves.png")
        print(
            "\nwrote docs/demo_frontier.png, docs/demo_samples.png, docs/demo_multi_curves.png and "
            "docs/demo_multi_samples.png"
        )


def two_stage_demo(out: Path, config: str, name: str) -> float:
    """``divrl validate`` without weights (the base model's row) and the timed ``divrl fit`` of a two-stage demo, in
    ``out/<name>_base`` and ``out/<name>_fit``."""
    run("validate", "--config", config, "--trainer.default_root_dir", str(out / f"{name}_base"))
    return run("fit", "--config", config, "--trainer.default_root_dir", str(out / f"{name}_fit"))


def two_stage_table(out: Path, name: str) -> None:
    """The README table of a two-stage demo: validation and training rollouts of the base model and after each stage."""
    base, fit = scalars(out / f"{name}_base"), scalars(out / f"{name}_fit")
    print("| | val nSSM | val VSM | train nSSM | train VSM | below the gate |")
    print("| --- | --- | --- | --- | --- | --- |")
    nssm, vsm, gated = fit["reward/nssm"], fit["reward/vsm"], fit["reward/gated_fraction"]
    print(
        f"| base model (`divrl validate` without a checkpoint) | {base['val/nssm'][-1][1]:.3f} | "
        f"{base['val/vsm'][-1][1]:.3f} | {mean(nssm, 0, 9):.3f} (steps 0–9) | {mean(vsm, 0, 9):.3f} | — |"
    )
    print(
        f"| end of stage 1 (step 60, R1 = nSSM) | {at(fit['val/nssm'], 59):.3f} | {at(fit['val/vsm'], 59):.3f} | "
        f"{mean(nssm, 50, 59):.3f} (steps 50–59) | {mean(vsm, 50, 59):.3f} | — |"
    )
    print(
        f"| end of stage 2 (step 120, R2 gated at VSM 0.5) | {at(fit['val/nssm'], 119):.3f} | "
        f"{at(fit['val/vsm'], 119):.3f} | {mean(nssm, 110, 119):.3f} (steps 110–119) | {mean(vsm, 110, 119):.3f} | "
        f"{mean(gated, 110, 119):.0%} |\n"
    )


def kontext_demo(out: Path) -> None:
    """The Kontext demo: its fit, its table and its evaluation (``out/kontext_*``, ``out/eval``)."""
    seconds = two_stage_demo(out, "configs/demo.yaml", "kontext")
    fit = out / "kontext_fit"
    methods = json.dumps({"base": None, "explore": str(fit / "lora/stage1"), "divrl": str(fit / "lora/final")})
    run(
        "evaluate",
        "--config",
        "configs/eval_demo.yaml",
        "--methods",
        methods,
        "--output_dir",
        str(out / "eval"),
        "--progress",
        "false",
    )

    print(f"demo fit: {seconds:.0f} s on this machine\n")
    two_stage_table(out, "kontext")

    metrics = json.loads((out / "eval/metrics.json").read_text())["methods"]
    columns = ("vsm", "si_iou", "mtg_nssm", "sdino", "consistency_ratio", "diversity_over_consistency")
    names = {"base": "base", "explore": "explore (after stage 1)", "divrl": "divrl (after stage 2)"}
    print(
        "| method | VSM-0.7 ↑ | si-IoU ↓ | MTG-nSSM ↑ | sDINO ↑ | consistency ratio ↑ | diversity over consistency ↑ |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, label in names.items():
        row = metrics[method]["overall"]
        cells = ["—" if row.get(c) is None else f"{row[c]:.3f}" for c in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")


MULTI_VAL = ("val/reward", "val/psr", "val/psr/found", "val/divrl/vsm", "val/divrl/nssm", "val/gated_fraction")


def multi_demo(out: Path) -> float:
    """Validate the two-subject base model, train the multi-subject demo (timed), evaluate base and trained."""
    run("validate", "--config", "configs/demo_multi.yaml", "--trainer.default_root_dir", str(out / "base_multi"))
    seconds = run("fit", "--config", "configs/demo_multi.yaml", "--trainer.default_root_dir", str(out / "fit_multi"))
    methods = json.dumps({"base": None, "divrl": str(out / "fit_multi/lora/final")})
    run(
        "evaluate",
        "--config",
        "configs/eval_demo_multi.yaml",
        "--methods",
        methods,
        "--output_dir",
        str(out / "eval_multi"),
        "--progress",
        "false",
    )
    return seconds


def multi_tables(out: Path) -> None:
    base, fit = scalars(out / "base_multi"), scalars(out / "fit_multi")
    print("| | val reward | val PSR | val found | val VSM/subject | val nSSM/subject | val below the gate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        "| base model (`divrl validate` without a checkpoint) | "
        + " | ".join(f"{base[t][-1][1]:.3f}" for t in MULTI_VAL)
        + " |"
    )
    for step in (19, 39, 59):
        print(f"| step {step + 1} | " + " | ".join(f"{at(fit[t], step):.3f}" for t in MULTI_VAL) + " |")
    metrics = json.loads((out / "eval_multi/metrics.json").read_text())["methods"]
    columns = (
        "sc",
        "sc_1",
        "sc_2",
        "found",
        "subject_vsm",
        "subject_nssm",
        "consistency_ratio",
        "diversity_over_consistency",
    )
    print(
        "\n| method | SC ↑ | SC-1 ↑ | SC-2 ↑ | found ↑ | VSM/subject ↑ | nSSM/subject ↑ | consistency ratio ↑ | "
        "diversity over consistency ↑ |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in ("base", "divrl"):
        row = metrics[method]["overall"]
        print(f"| {method} | " + " | ".join("—" if row.get(c) is None else f"{row[c]:.3f}" for c in columns) + " |")


def multi_curves(out: Path, path: Path) -> None:
    """Training rewards (mean over 5 updates) and the validation points of the multi-subject demo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, fit = scalars(out / "base_multi"), scalars(out / "fit_multi")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for tag, label in (
        ("reward/mean", "reward"),
        ("reward/psr", "PSR"),
        ("reward/divrl/vsm", "VSM/subject"),
        ("reward/divrl/found", "found"),
    ):
        values = [v for _, v in sorted(fit[tag])]
        smooth = [statistics.mean(values[i : i + 5]) for i in range(0, len(values), 5)]
        axes[0].plot([i + 2.5 for i in range(0, len(values), 5)], smooth, marker=".", label=label)
    axes[0].set_title("training rollouts (mean of 5 updates)")
    for tag, label in zip(MULTI_VAL[:5], ("reward", "PSR", "found", "VSM/subject", "nSSM/subject")):
        points = [(0, base[tag][-1][1])] + [(s + 1, at(fit[tag], s)) for s in (19, 39, 59)]
        axes[1].plot(*zip(*points), marker="o", label=label)
    axes[1].set_title("held-out conditions (deterministic sampler)")
    for ax in axes:
        ax.set_xlabel("update")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def stack(paths: list[Path], target: Path) -> None:
    """PNG grids one above the other, on white."""
    from PIL import Image

    grids = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    y = 0
    for grid in grids:
        canvas.paste(grid, (0, y))
        y += grid.height
    canvas.save(target, optimize=True)


if __name__ == "__main__":
    main()

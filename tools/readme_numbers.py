"""Regenerate the CPU demos' tables and pictures in the documentation from this checkout (offline, a few minutes).

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

then prints the tables as markdown, the demos' wall times and the package versions. With ``--write-docs`` it also
writes each table of the demos it ran into its page, between the page's ``<!-- numbers: NAME -->`` and
``<!-- /numbers -->`` markers (``TABLES`` names the pages; all are checked before anything runs), and replaces the
pictures of the demos it ran: ``docs/demo_frontier.png`` and ``docs/demo_samples.png`` (the three methods' grids, one
above the other) for Kontext, ``docs/demo_multi_curves.png`` and ``docs/demo_multi_samples.png`` for the multi-subject
demo. The prose around the tables is not rewritten:
read it again after a run that moved the numbers.

    python tools/readme_numbers.py --out runs/readme --write-docs
    python tools/readme_numbers.py --out runs/readme_klein --demos klein --write-docs     # one demo's table
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


# Where each table lives: ``{name: page}``; the page holds ``<!-- numbers: name -->`` ... ``<!-- /numbers -->``.
TABLES = {
    "versions": "training.md",
    "kontext-training": "training.md",
    "kontext-evaluation": "evaluation.md",
    "multi-validation": "several-subjects.md",
    "multi-evaluation": "several-subjects.md",
    "klein-training": "model-families.md",
    "qwen-training": "model-families.md",
}
END_MARKER = "<!-- /numbers -->"


def replace_block(text: str, name: str, body: str, page: str = "the page") -> str:
    """``text`` with what stands between ``<!-- numbers: name -->`` and the next ``<!-- /numbers -->`` replaced by
    ``body`` (markers kept, each on its own line, a blank line either side of ``body``)."""
    begin = f"<!-- numbers: {name} -->"
    if text.count(begin) != 1:
        raise ValueError(
            f"{page} holds {text.count(begin)} '{begin}' markers, not 1: put one line '{begin}' above the table and "
            f"one '{END_MARKER}' below it"
        )
    head, rest = text.split(begin, 1)
    if END_MARKER not in rest or "<!-- numbers:" in rest.split(END_MARKER, 1)[0]:
        raise ValueError(f"{page}: '{begin}' has no '{END_MARKER}' after it; close the block with that line")
    tail = rest.split(END_MARKER, 1)[1]
    return f"{head}{begin}\n\n{body.strip()}\n\n{END_MARKER}{tail}"


def write_tables(tables: dict[str, str], docs: Path) -> list[str]:
    """Each of ``tables`` (``{name: markdown}``) written into its page of ``docs`` (``TABLES``); the pages written."""
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise KeyError(f"no page for the tables {sorted(unknown)}: add them to TABLES")
    pages = sorted({TABLES[name] for name in tables})
    for page in pages:
        path = docs / page
        text = path.read_text()
        for name, body in tables.items():
            if TABLES[name] == page:
                text = replace_block(text, name, body, page=f"docs/{page}")
        path.write_text(text)
    return pages


def check_markers(names: list[str], docs: Path) -> None:
    """Fail before any demo runs when a page lacks the markers of one of ``names``' tables."""
    for name in names:
        replace_block((docs / TABLES[name]).read_text(), name, "", page=f"docs/{TABLES[name]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (emptied first)")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="write the tables and pictures of the demos run into their pages in docs/",
    )
    parser.add_argument(
        "--demos",
        default="kontext,multi,klein,qwen",
        help="comma-separated demos to run: kontext, multi, klein, qwen (default: all)",
    )
    args = parser.parse_args()
    demos = set(args.demos.split(","))
    if demos - {"kontext", "multi", "klein", "qwen"}:
        parser.error(f"--demos {args.demos}: name kontext, multi, klein or qwen")
    if args.write_docs:
        names = {"kontext": ["versions", "kontext-training", "kontext-evaluation"], "multi": ["multi-validation"]}
        names["multi"].append("multi-evaluation")
        check_markers([n for demo in demos for n in names.get(demo, [f"{demo}-training"])], ROOT / "docs")
    out = args.out.resolve()
    marker = out / ".readme_numbers"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        sys.exit(f"readme_numbers.py: --out {out} holds files this tool did not write; pass a new or empty folder")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()
    versions = ", ".join(f"{p} {version(p)}" for p in PACKAGES)
    print(f"versions: {versions}\n")
    tables: dict[str, str] = {}

    if "kontext" in demos:
        seconds = kontext_demo(out)
        print(f"demo fit: {seconds:.0f} s on this machine\n")
        tables["versions"] = f"Last run with {versions}."
        tables["kontext-training"] = two_stage_table(scalars(out / "kontext_base"), scalars(out / "kontext_fit"))
        tables["kontext-evaluation"] = kontext_evaluation_table(json.loads((out / "eval/metrics.json").read_text()))
    if "multi" in demos:
        multi_seconds = multi_demo(out)
        print(f"multi-subject demo fit: {multi_seconds:.0f} s on this machine\n")
        tables["multi-validation"] = multi_validation_table(scalars(out / "base_multi"), scalars(out / "fit_multi"))
        tables["multi-evaluation"] = multi_evaluation_table(json.loads((out / "eval_multi/metrics.json").read_text()))
    for name, config, label in (
        ("klein", "configs/demo_klein.yaml", "FLUX.2 [klein]"),
        ("qwen", "configs/demo_qwen_edit.yaml", "Qwen-Image-Edit"),
    ):
        if name in demos:
            seconds = two_stage_demo(out, config, name)
            print(f"{label} demo fit: {seconds:.0f} s on this machine\n")
            tables[f"{name}-training"] = two_stage_table(scalars(out / f"{name}_base"), scalars(out / f"{name}_fit"))
    for name, body in tables.items():
        print(f"{name}:\n{body}\n")

    if args.write_docs:
        pages = write_tables(tables, ROOT / "docs")
        print("wrote the tables into " + ", ".join(f"docs/{page}" for page in pages))
        if "kontext" in demos:  # each demo's pictures with its tables, from the same run
            shutil.copy(out / "eval/frontier.png", ROOT / "docs/demo_frontier.png")
            methods = ("base", "explore", "divrl")
            stack([out / "eval" / method / "grid.png" for method in methods], ROOT / "docs/demo_samples.png")
            print("wrote docs/demo_frontier.png and docs/demo_samples.png")
        if "multi" in demos:
            stack(
                [out / "eval_multi" / method / "grid.png" for method in ("base", "divrl")],
                ROOT / "docs/demo_multi_samples.png",
            )
            multi_curves(out, ROOT / "docs/demo_multi_curves.png")
            print("wrote docs/demo_multi_curves.png and docs/demo_multi_samples.png")


def two_stage_demo(out: Path, config: str, name: str) -> float:
    """``divrl validate`` without weights (the base model's row) and the timed ``divrl fit`` of a two-stage demo, in
    ``out/<name>_base`` and ``out/<name>_fit``."""
    run("validate", "--config", config, "--trainer.default_root_dir", str(out / f"{name}_base"))
    return run("fit", "--config", config, "--trainer.default_root_dir", str(out / f"{name}_fit"))


def two_stage_table(base: dict, fit: dict) -> str:
    """The table of a two-stage demo from its logs' scalars (``base``: ``divrl validate``'s, ``fit``: ``divrl fit``'s):
    validation and training rollouts of the base model and after each stage."""
    nssm, vsm, gated = fit["reward/nssm"], fit["reward/vsm"], fit["reward/gated_fraction"]
    return "\n".join(
        (
            "| | val nSSM | val VSM | train nSSM | train VSM | below the gate |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| base model (`divrl validate` without a checkpoint) | {base['val/nssm'][-1][1]:.3f} | "
            f"{base['val/vsm'][-1][1]:.3f} | {mean(nssm, 0, 9):.3f} (steps 0–9) | {mean(vsm, 0, 9):.3f} | — |",
            f"| end of stage 1 (step 60, R1 = nSSM) | {at(fit['val/nssm'], 59):.3f} | {at(fit['val/vsm'], 59):.3f} | "
            f"{mean(nssm, 50, 59):.3f} (steps 50–59) | {mean(vsm, 50, 59):.3f} | — |",
            f"| end of stage 2 (step 120, R2 gated at VSM 0.5) | {at(fit['val/nssm'], 119):.3f} | "
            f"{at(fit['val/vsm'], 119):.3f} | {mean(nssm, 110, 119):.3f} (steps 110–119) | "
            f"{mean(vsm, 110, 119):.3f} | {mean(gated, 110, 119):.0%} |",
        )
    )


def kontext_demo(out: Path) -> float:
    """The Kontext demo: its fit (the wall time returned) and its evaluation (``out/kontext_*``, ``out/eval``)."""
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
    return seconds


def metrics_table(metrics: dict, header: str, columns: tuple[str, ...], names: dict[str, str]) -> str:
    """One row per method of ``divrl evaluate``'s ``metrics.json`` (``names``: ``{method: label}``), its ``overall``
    ``columns`` to 3 decimals (— where a metric is missing)."""
    rows = [header, "| " + " | ".join(["---"] * (len(columns) + 1)) + " |"]
    for method, label in names.items():
        row = metrics["methods"][method]["overall"]
        rows.append(
            f"| {label} | " + " | ".join("—" if row.get(c) is None else f"{row[c]:.3f}" for c in columns) + " |"
        )
    return "\n".join(rows)


def kontext_evaluation_table(metrics: dict) -> str:
    return metrics_table(
        metrics,
        "| method | VSM-0.7 ↑ | si-IoU ↓ | MTG-nSSM ↑ | sDINO ↑ | consistency ratio ↑ | diversity over consistency ↑ |",
        ("vsm", "si_iou", "mtg_nssm", "sdino", "consistency_ratio", "diversity_over_consistency"),
        {"base": "base", "explore": "explore (after stage 1)", "divrl": "divrl (after stage 2)"},
    )


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


def multi_validation_table(base: dict, fit: dict) -> str:
    """The multi-subject demo's validation rows: the base model and every 20 updates."""
    rows = [
        "| | val reward | val PSR | val found | val VSM/subject | val nSSM/subject | val below the gate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| base model (`divrl validate` without a checkpoint) | "
        + " | ".join(f"{base[t][-1][1]:.3f}" for t in MULTI_VAL)
        + " |",
    ]
    for step in (19, 39, 59):
        rows.append(f"| step {step + 1} | " + " | ".join(f"{at(fit[t], step):.3f}" for t in MULTI_VAL) + " |")
    return "\n".join(rows)


def multi_evaluation_table(metrics: dict) -> str:
    return metrics_table(
        metrics,
        "| method | SC ↑ | SC-1 ↑ | SC-2 ↑ | found ↑ | VSM/subject ↑ | nSSM/subject ↑ | consistency ratio ↑ | "
        "diversity over consistency ↑ |",
        (
            "sc",
            "sc_1",
            "sc_2",
            "found",
            "subject_vsm",
            "subject_nssm",
            "consistency_ratio",
            "diversity_over_consistency",
        ),
        {"base": "base", "divrl": "divrl"},
    )


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

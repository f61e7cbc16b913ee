"""GRPO vs group DPO vs DiffusionNFT vs SFT → DPO on the CPU demo: held-out reward against training seconds.

Every method trains the same LoRA (rank 8) on the same demo model (``data/demo/tiny-kontext``, which copies its
reference) and the same data (``data/demo``), for the same budget of training-step seconds
(:class:`divrl.training.TrainTimeLimit`: rollouts, rewards and updates; validation excluded), and is validated on the 8
held-out identities (4 deterministic samples each) every ``--val-every`` batches with DivRL's stage-2 reward R2
(nSSM − 5·(0.5 − VSM)² below VSM 0.5). The methods:

  grpo        Flow-GRPO, the demo's stage-2 settings (SDE rollouts, G = 8), configs/demo.yaml
  group_dpo   GroupDPOObjective (DGPO): deterministic rollouts, G = 8, β 30, two passes
  nft         NFTObjective (DiffusionNFT): deterministic rollouts, G = 8, β 1
  sft_dpo     configs/demo_idglow.yaml without its gating: SFT on the shards' target images, then group DPO
  idglow      configs/demo_idglow.yaml: the same with identity gating (reference tokens only for σ in [0.3, 0.6])

Every method uses the demo's optimizer (AdamW, lr 3e-4). Each run is a ``divrl fit`` subprocess of its own (one at a
time: the machine's cores are the clock), its output in ``fit.log`` beside its ``curve.json``; a failed run stops
the script with that log's end. The base model's held-out reward (``divrl validate``, ungated and gated) is
the curves' starting point.

Run:  python benchmarks/objectives.py [--budget 150] [--seeds 0,1,2] [--methods grpo,group_dpo,nft,sft_dpo,idglow]
      [--out runs/objectives] [--plot docs/objectives.png] [--json docs/objectives.json]
      python benchmarks/objectives.py --replot docs/objectives.json --plot docs/objectives.png   (no training)

Seed ``s`` trains with ``seed_everything: s`` (LoRA initialisation, data order) and ``model.sampling.seed: 42 + s``
(rollout and validation noise; seed 0 is the demo's own run). A finished run (``<out>/<method>/seed<s>/curve.json``)
is not trained again: rerunning with more seeds or methods trains only what is missing; an unfinished one starts
over. ``benchmarks/ablations.py`` runs it with 3 seeds.

It prints one table: the held-out reward (and its nSSM, VSM) at a quarter, half and all of the budget (the last
validation at or before each), as the mean ± sd over the seeds, the number of training batches done, and which
differences at the end of the budget are larger than the spread over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
IDGLOW = ROOT / "configs" / "demo_idglow.yaml"

R2 = yaml.safe_load(DEMO.read_text())["model"]["rewards"][1]  # the demo's GatedReward: one reward for every method
DPO = {"beta": 30.0, "epochs": 2, "timesteps_per_sample": 2, "timesteps": {"distribution": "uniform", "low": 0.5}}
METHODS = {  # (config, model overrides); each objective's settings from a small sweep at the demo's lr (README)
    "grpo": (
        DEMO,
        {
            "objective": {
                "class_path": "divrl.objectives.GRPOObjective",
                "init_args": {"micro_batch_size": 8, "timestep_fraction": 0.99},
            }
        },
    ),
    "group_dpo": (DEMO, {"objective": {"class_path": "divrl.objectives.GroupDPOObjective", "init_args": DPO}}),
    "nft": (
        DEMO,
        {
            "objective": {
                "class_path": "divrl.objectives.NFTObjective",
                "init_args": {"beta": 1.0, "micro_batch_size": 8, "timesteps_per_sample": 2},
            }
        },
    ),
    "sft_dpo": (IDGLOW, {"policy": {"reference_window": None}}),  # the IdGlow curriculum without the gating
    "idglow": (IDGLOW, {}),
}
LABELS = {
    "grpo": "Flow-GRPO",
    "group_dpo": "group DPO (DGPO)",
    "nft": "DiffusionNFT",
    "sft_dpo": "SFT → group DPO",
    "idglow": "SFT → group DPO, gated (IdGlow)",
}


SAMPLING_SEED = 42  # SamplingConfig.seed's default: seed s draws its noise from 42 + s
POINT = ("seconds", "batches", "reward", "nssm", "vsm")  # a validation point of a curve


def divrl(args: list[str], log: Path) -> None:
    """``divrl ARGS`` from the repository root, its output in ``log``; a failure stops with the log's end."""
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "divrl.cli", *args], cwd=ROOT, stdout=out, stderr=out)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"`divrl {shlex.join(args)}` failed (exit {done.returncode}); its log {log} ends:\n{tail}")


def override_text(out: Path, method: str, budget: float, val_every: int, seed: int = 0) -> str:
    """The override config of one run (``out`` is the run's seed folder), as YAML."""
    config, model = METHODS[method]
    callbacks = [{"class_path": "divrl.training.TrainTimeLimit", "init_args": {"seconds": budget}}]
    if config == IDGLOW:  # keep its stage switch
        callbacks.insert(0, yaml.safe_load(IDGLOW.read_text())["trainer"]["callbacks"][0])
    else:
        model = {**model, "rewards": [R2]}
    model = {**model, "sampling": {**model.get("sampling", {}), "seed": SAMPLING_SEED + seed}}
    data = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": 100000,
            "default_root_dir": str(out / method),
            "enable_progress_bar": False,
            "check_val_every_n_epoch": 1,
            "callbacks": callbacks,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out / method)},
            },
        },
        "model": model,
        "data": {"steps_per_epoch": val_every},
    }
    return yaml.safe_dump(data, sort_keys=False)


def overrides(out: Path, method: str, budget: float, val_every: int, seed: int = 0) -> Path:
    """The override config of one run, written to ``out/<method>.yaml`` (``out`` is the run's seed folder)."""
    path = out / f"{method}.yaml"
    path.write_text(override_text(out, method, budget, val_every, seed))
    return path


def fit_command(folder: Path, method: str) -> list[str]:
    """The ``divrl fit`` arguments of one run whose override config lies in ``folder``."""
    return ["fit", "--config", str(METHODS[method][0]), "--config", str(folder / f"{method}.yaml")]


def validate_command(folder: Path, gated: bool) -> list[str]:
    """The ``divrl validate`` arguments of the base model's point in ``folder``."""
    method = "idglow" if gated else "grpo"  # the demo's validation under R2, or the gated config's
    return [
        "validate",
        "--config",
        str(IDGLOW if gated else DEMO),
        "--config",
        str(folder / f"{method}.yaml"),
        "--trainer.default_root_dir",
        str(folder),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={folder}",
    ]


def check_reuse(folder: Path, method: str, budget: float, val_every: int, seed: int) -> None:
    """Refuse to reuse a finished run whose override config differs from what this version would write."""
    if (folder / f"{method}.yaml").read_text() != override_text(folder, method, budget, val_every, seed):
        raise SystemExit(
            f"{folder} holds a run made with other settings ({folder / f'{method}.yaml'} differs from what "
            f"--budget {budget} --val-every {val_every} --seeds {seed} give now): remove it, or pass another --out"
        )


def read_curve(folder: Path) -> list[dict]:
    """(train seconds, batches, val reward, val nSSM, val VSM) at each validation of a run's metrics.csv. The logged
    step counts training batches from 0 (the first batch's row is step 0, a validation after 10 batches is logged at
    step 9), so the batches done are the step + 1; an objective with two updates per batch does twice as many
    updates."""
    rows = []
    for path in sorted(folder.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    seconds = {int(r["step"]): float(r["time/train_s"]) for r in rows if r.get("time/train_s")}
    curve = []
    for r in rows:
        if r.get("val/reward"):
            step = int(r["step"])
            done = max((s for s in seconds if s <= step), default=None)  # the last training row at or before it
            curve.append(
                {
                    "seconds": seconds[done] if done is not None else 0.0,
                    "batches": step + 1,
                    "reward": float(r["val/reward"]),
                    "nssm": float(r["val/nssm"]),
                    "vsm": float(r["val/vsm"]),
                }
            )
    return sorted(curve, key=lambda c: c["seconds"])


def base_point(out: Path, gated: bool, seed: int = 0) -> dict:
    """The base model's held-out scores (no LoRA), ungated or with configs/demo_idglow.yaml's gating, on seed
    ``seed``'s validation noise (cached in ``out/base[_gated]/seed<seed>/point.json``)."""
    name = f"base_gated/seed{seed}" if gated else f"base/seed{seed}"
    method = "idglow" if gated else "grpo"
    if (out / name / "point.json").exists():
        check_reuse(out / name, method, 1.0, 1, seed)
        return json.loads((out / name / "point.json").read_text())
    start = time.monotonic()
    shutil.rmtree(out / name, ignore_errors=True)
    (out / name).mkdir(parents=True)
    overrides(out / name, method, 1.0, 1, seed)
    divrl(validate_command(out / name, gated), out / name / "validate.log")
    rows = [
        r for p in sorted((out / name).glob("lightning_logs/version_*/metrics.csv")) for r in csv.DictReader(p.open())
    ]
    r = next(r for r in rows if r.get("val/reward"))
    point = {
        "seconds": 0.0,
        "batches": 0,
        "reward": float(r["val/reward"]),
        "nssm": float(r["val/nssm"]),
        "vsm": float(r["val/vsm"]),
        "wall": round(time.monotonic() - start, 1),  # seconds `divrl validate` took
    }
    (out / name / "point.json").write_text(json.dumps(point))
    return point


def train(out: Path, method: str, seed: int, budget: float, val_every: int) -> tuple[list[dict], float]:
    """One method at one seed: ``divrl fit`` in ``out/<method>/seed<seed>`` (skipped when its ``curve.json`` is there,
    started over when the folder holds an unfinished run); its validations (from its ``metrics.csv``), without the base
    point, and the wall seconds the fit took."""
    folder = out / method / f"seed{seed}"
    if (folder / "curve.json").exists():  # finished: its curve read again from its metrics.csv, as this version reads
        check_reuse(folder, method, budget, val_every, seed)
        curve = read_curve(folder / method)
        if not curve:
            raise SystemExit(f"{folder} holds a finished run without its metrics.csv validations: remove the folder")
        return curve, json.loads((folder / "curve.json").read_text())["wall"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.monotonic()
    overrides(folder, method, budget, val_every, seed)
    divrl(fit_command(folder, method), folder / "fit.log")
    curve, wall = read_curve(folder / method), round(time.monotonic() - start, 1)
    record = {"budget": budget, "val_every": val_every, "curve": curve, "wall": wall}
    (folder / "curve.json").write_text(json.dumps(record))
    return curve, wall


def at(curve: list[dict], seconds: float, budget: float) -> dict:
    """The last validation at or before ``seconds`` (the run's last one for the whole budget: the run stops after the
    update that crosses it)."""
    return curve[-1] if seconds >= budget else [c for c in curve if c["seconds"] <= seconds][-1]


def run_all(out: Path, methods: list[str], seeds: list[int], budget: float, val_every: int) -> dict:
    """Every method at every seed (finished runs reused); the JSON-ready results: budget, seeds, each seed's base
    points, each run's curve (the seed's base point first) and the wall seconds of each run (``wall``)."""
    out.mkdir(parents=True, exist_ok=True)
    bases, curves, wall = {}, {m: {} for m in methods}, {m: {} for m in methods}
    for seed in seeds:  # seed by seed, so that an interrupted run leaves every method with the same seeds
        bases[str(seed)] = {
            "ungated": base_point(out, False, seed),
            "gated": base_point(out, True, seed) if "idglow" in methods else None,
        }
        for method in methods:
            base = {
                k: v for k, v in bases[str(seed)]["gated" if method == "idglow" else "ungated"].items() if k in POINT
            }
            curve, wall[method][str(seed)] = train(out, method, seed, budget, val_every)
            curves[method][str(seed)] = [base, *curve]
    return {"budget": budget, "val_every": val_every, "seeds": seeds, "bases": bases, "curves": curves, "wall": wall}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(saved: dict) -> tuple[dict, list[dict]]:
    """Per method, each budget point's mean ± sd over seeds (reward, nSSM, VSM, batches); and every pair of methods
    whose end-of-budget rewards differ by more than the sum of their sds, with Welch's t-test p-value."""
    from scipy.stats import ttest_ind

    budget, table, ends = saved["budget"], {}, {}
    for method, runs in saved["curves"].items():
        rows = {}
        for fraction in FRACTIONS:
            points = [at(curve, fraction * budget, budget) for curve in runs.values()]
            rows[f"{fraction:.0%}"] = {
                key: mean_sd([p[key] for p in points]) for key in ("reward", "nssm", "vsm", "batches", "seconds")
            }
        table[method] = rows
        ends[method] = [curve[-1]["reward"] for curve in runs.values()]
    pairs = []
    for a, b in combinations(table, 2):
        (ma, sa), (mb, sb) = table[a]["100%"]["reward"], table[b]["100%"]["reward"]
        if min(len(ends[a]), len(ends[b])) > 1 and abs(ma - mb) > sa + sb:  # one seed has no spread to compare
            p = ttest_ind(ends[a], ends[b], equal_var=False).pvalue
            pairs.append({"better": a if ma > mb else b, "worse": b if ma > mb else a, "gap": abs(ma - mb), "p": p})
    return table, pairs


FRACTIONS = (0.25, 0.5, 1.0)


def markdown(saved: dict) -> str:
    """The table (mean ± sd over seeds) and the differences larger than the spread, as markdown."""
    table, pairs = summary(saved)
    budget, n = saved["budget"], len(saved["seeds"])
    cells = " | ".join(f"{f * budget:.0f} s" for f in FRACTIONS)
    lines = [f"| method | {cells} | nSSM | VSM | batches |", "| --- " * 7 + "|"]
    for method, rows in table.items():
        end = rows["100%"]
        lines.append(
            f"| {LABELS[method]} | "
            + " | ".join("{:.3f} ± {:.3f}".format(*rows[f"{f:.0%}"]["reward"]) for f in FRACTIONS)
            + " | {:.3f} ± {:.3f} | {:.3f} ± {:.3f} | {:.0f} ± {:.0f} |".format(
                *end["nssm"], *end["vsm"], *end["batches"]
            )
        )
    lines.append("")
    lines.append(
        f"Mean ± sd over {n} seeds ({', '.join(map(str, saved['seeds']))}). Differences at {budget:.0f} s larger than "
        "the two methods' sds added (Welch's t-test p in parentheses):"
    )
    lines.append("")
    for pair in pairs:
        lines.append(
            f"- {LABELS[pair['better']]} above {LABELS[pair['worse']]} by {pair['gap']:.3f} (p = {pair['p']:.3f})"
        )
    if not pairs:
        lines.append("- none: every gap lies within the spread over seeds" if n > 1 else "- one seed: no spread")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=150.0, help="training-step seconds per method (default 150)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--val-every", type=int, default=5, help="validate every this many batches (default 5)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "objectives")
    parser.add_argument("--plot", type=Path, help="write the curves here (PNG)")
    parser.add_argument("--json", type=Path, help="write the curves and the table here")
    parser.add_argument(
        "--replot", type=Path, help="train nothing: print the table and plot the curves of a --json file"
    )
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
    else:
        methods = args.methods.split(",")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        saved = run_all(args.out, methods, seeds, args.budget, args.val_every)
    report(saved, args.json, args.plot)


def report(saved: dict, json_path: Path | None, plot_path: Path | None) -> None:
    """Print the table; write the JSON and the plot when asked."""
    base = mean_sd([b["ungated"]["reward"] for b in saved["bases"].values()])
    print(
        f"held-out reward R2 (8 identities x 4 samples) after a quarter, half and all of {saved['budget']:.0f} "
        "training seconds; base model {:.3f} ± {:.3f}\n".format(*base)
    )
    print(markdown(saved))
    if json_path:
        table, pairs = summary(saved)
        json_path.write_text(json.dumps({**saved, "table": table, "pairs": pairs}, indent=1))
    if plot_path:
        plot(saved, plot_path)


def band(curves: list[list[dict]], grid: list[float], budget: float) -> tuple[list[float], list[float]]:
    """Mean and sd over seeds of the reward at each time of ``grid`` (each seed's last validation at or before it)."""
    values = [[at(curve, t, budget)["reward"] for curve in curves] for t in grid]
    return [mean_sd(v)[0] for v in values], [mean_sd(v)[1] for v in values]


def plot(saved: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = saved["budget"]
    grid = [budget * i / 60 for i in range(61)]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for method, runs in saved["curves"].items():
        mean, sd = band(list(runs.values()), grid, budget)
        (line,) = ax.step(grid, mean, where="post", label=f"{LABELS[method]} (n = {len(runs)})")
        low, high = [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
        ax.fill_between(grid, low, high, step="post", color=line.get_color(), alpha=0.15, lw=0)
    base = mean_sd([b["ungated"]["reward"] for b in saved["bases"].values()])[0]
    ax.axhline(base, color="grey", ls=":", lw=1, label="base model")
    gated = [b["gated"]["reward"] for b in saved["bases"].values() if b.get("gated")]
    if gated:
        ax.axhline(mean_sd(gated)[0], color="tab:purple", ls=":", lw=1, label="base model, gated")
    ax.set_xlabel("training seconds (2-core CPU; validation excluded)")
    ax.set_ylabel("held-out reward R2 (mean ± sd over seeds)")
    ax.set_title("Objectives on the CPU demo: same data, reward and budget")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    main()

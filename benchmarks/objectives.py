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
time: the machine's cores are the clock). The base model's held-out reward (``divrl validate``, ungated and gated) is
the curves' starting point.

Run:  python benchmarks/objectives.py [--budget 150] [--methods grpo,group_dpo,nft,sft_dpo,idglow] [--out runs/objectives]
      [--plot docs/objectives.png] [--json docs/objectives.json]
      python benchmarks/objectives.py --replot docs/objectives.json --plot docs/objectives.png   (no training)

It prints one table: the held-out reward (and its nSSM, VSM) at a quarter, half and all of the budget (the last
validation at or before each), and the number of training batches done.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
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


def divrl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "divrl.cli", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def overrides(out: Path, method: str, budget: float, val_every: int) -> Path:
    config, model = METHODS[method]
    callbacks = [{"class_path": "divrl.training.TrainTimeLimit", "init_args": {"seconds": budget}}]
    if config == IDGLOW:  # keep its stage switch
        callbacks.insert(0, yaml.safe_load(IDGLOW.read_text())["trainer"]["callbacks"][0])
    else:
        model = {**model, "rewards": [R2]}
    data = {
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
    path = out / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_curve(folder: Path) -> list[dict]:
    """(train seconds, batches, val reward, val nSSM, val VSM) at each validation of a run's metrics.csv (the logged
    step counts training batches: an objective with two updates per batch does twice as many updates)."""
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
                    "batches": step,
                    "reward": float(r["val/reward"]),
                    "nssm": float(r["val/nssm"]),
                    "vsm": float(r["val/vsm"]),
                }
            )
    return sorted(curve, key=lambda c: c["seconds"])


def base_point(out: Path, gated: bool) -> dict:
    """The base model's held-out scores (no LoRA), ungated or with configs/demo_idglow.yaml's gating."""
    name = "base_gated" if gated else "base"
    args = ["validate", "--config", str(IDGLOW if gated else DEMO)]
    if not gated:  # the demo's validation under R2
        args += ["--config", str(overrides(out, "grpo", 1.0, 1))]
    divrl(
        *args,
        "--trainer.default_root_dir",
        str(out / name),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={out / name}",
    )
    rows = [
        r for p in sorted((out / name).glob("lightning_logs/version_*/metrics.csv")) for r in csv.DictReader(p.open())
    ]
    r = next(r for r in rows if r.get("val/reward"))
    return {
        "seconds": 0.0,
        "batches": 0,
        "reward": float(r["val/reward"]),
        "nssm": float(r["val/nssm"]),
        "vsm": float(r["val/vsm"]),
    }


def at(curve: list[dict], seconds: float, budget: float) -> dict:
    """The last validation at or before ``seconds`` (the run's last one for the whole budget: the run stops after the
    update that crosses it)."""
    return curve[-1] if seconds >= budget else [c for c in curve if c["seconds"] <= seconds][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=150.0, help="training-step seconds per method (default 150)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
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
        report(saved["curves"], saved["bases"], saved["budget"], args)
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    bases = {False: base_point(args.out, False)}
    if "idglow" in methods:
        bases[True] = base_point(args.out, True)
    curves = {}
    for method in methods:
        if (args.out / method).exists():
            raise SystemExit(f"{args.out / method} exists: remove it, or pass another --out")
        divrl(
            "fit",
            "--config",
            str(METHODS[method][0]),
            "--config",
            str(overrides(args.out, method, args.budget, args.val_every)),
        )
        curves[method] = [bases[method == "idglow"], *read_curve(args.out / method)]
    report(curves, {"ungated": bases[False], "gated": bases.get(True)}, args.budget, args)


def report(curves: dict, bases: dict, budget: float, args) -> None:
    """Print the table; write the JSON and the plot when asked."""
    gated = bases.get("gated") or {}
    print(
        f"held-out reward R2 (8 identities x 4 samples) after a quarter, half and all of {budget:.0f} training "
        f"seconds; base model {bases['ungated']['reward']:.3f} (gated: {gated.get('reward', float('nan')):.3f})"
    )
    print("| method | 25% | 50% | 100% | nSSM | VSM | batches |\n" + "|---" * 7 + "|")
    table = {}
    for method, curve in curves.items():
        points = [at(curve, f * budget, budget) for f in (0.25, 0.5, 1.0)]
        table[method] = points
        end = points[-1]
        print(
            f"| {LABELS[method]} | "
            + " | ".join(f"{p['reward']:.3f}" for p in points)
            + f" | {end['nssm']:.3f} | {end['vsm']:.3f} | {curve[-1]['batches']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"budget": budget, "bases": bases, "curves": curves, "table": table}, indent=1))
    if args.plot:
        plot(curves, bases, args.plot)


def plot(curves: dict, bases: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for method, curve in curves.items():
        ax.plot([c["seconds"] for c in curve], [c["reward"] for c in curve], marker="o", ms=3, label=LABELS[method])
    ax.axhline(bases["ungated"]["reward"], color="grey", ls=":", lw=1, label="base model")
    if bases.get("gated"):
        ax.axhline(bases["gated"]["reward"], color="tab:purple", ls=":", lw=1, label="base model, gated")
    ax.set_xlabel("training seconds (2-core CPU; validation excluded)")
    ax.set_ylabel("held-out reward R2")
    ax.set_title("Objectives on the CPU demo: same data, reward and budget")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    main()

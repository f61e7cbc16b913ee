"""The paper's ablations on the CPU demo, with seeds and error bars, from one resumable command.

Parts (``--only`` takes part names or method names):

- ``rewards``: Fig. 5 and Fig. 6. The demo recipe (``configs/demo.yaml``: R1 = nSSM for 60 updates, then R2 gated at
  VSM 0.5) as ``divrl``, and the same 120 updates with another reward in both stages
  (``configs/ablations/<method>.yaml`` on top of the demo): ``nssm_only``, ``vsm_only`` and the linear reward
  ``w·VSM + (1 − w)·nSSM`` as ``linear_w0.25``, ``linear_w0.5``, ``linear_w0.75``. Each run is ``divrl fit`` then
  ``divrl evaluate --config configs/eval_demo.yaml`` on its final LoRA; the base model is evaluated once (the
  evaluation's noise does not depend on the training seed) and validated once per seed (validation noise does).
- ``multi``: the multi-subject demo (``configs/demo_multi.yaml``: PSR + per-subject DivRL) as ``psr_divrl``,
  evaluated with ``configs/eval_demo_multi.yaml``, against its base model.
- ``objectives``: ``benchmarks/objectives.py``'s five objectives at ``--objectives-budget`` training seconds each.
- ``disentanglement``: nSSM against VSM on the demo world and on the DreamBooth photos
  (``benchmarks/disentanglement.py``); no training.

Seed ``s`` means ``--seed_everything s`` (LoRA initialisation, data order) and ``--model.sampling.seed 42+s``
(rollout and validation noise), so seed 0 is the documented demo run itself.

Resumable: each finished run leaves ``<out>/<part or method>/seed<s>/run.json`` (its arguments and numbers) and is
not run again; an unfinished one starts over; a run folder made with other arguments is refused. ``--replot`` trains
nothing and redraws the tables and figures from the JSON, byte for byte.

Writes ``--json`` (default ``<out>/ablations.json``): ``{"runs": [{"part", "method", "seed", "config", "metrics",
"seconds"}, ...], "disentanglement": {...}}``, where ``config`` holds the exact ``divrl`` arguments (the run folder
is added as ``--trainer.default_root_dir``, and ``evaluate`` gets ``--methods {method: <run>/lora/final}`` and
``--output_dir <run>/eval``). Entries of parts not run this time are kept from an existing file. The figures go
beside it (``ablations_curves.png``, ``ablations_frontier.png``, ``ablations_disentanglement.png``,
``objectives.png``); ``--write-docs`` writes the JSON and figures into ``docs/`` and the tables into
``docs/ablations.md`` and ``docs/objectives.md`` (between ``<!-- numbers: NAME -->`` markers).

    python benchmarks/ablations.py --write-docs                    # everything, 3 seeds (about 60 min on 2 cores)
    python benchmarks/ablations.py --only divrl,linear_w0.5 --seeds 0,1,2,3,4
    python benchmarks/ablations.py --replot --json docs/ablations.json --figures /tmp/figures
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tools")]

import ablation_report as report  # noqa: E402
import objectives  # noqa: E402
from readme_numbers import replace_block, scalars  # noqa: E402

REWARD_METHODS = {  # method: the override configs on top of configs/demo.yaml
    "divrl": [],
    "nssm_only": ["configs/ablations/nssm_only.yaml"],
    "vsm_only": ["configs/ablations/vsm_only.yaml"],
    "linear_w0.25": ["configs/ablations/linear_w0.25.yaml"],
    "linear_w0.5": ["configs/ablations/linear_w0.5.yaml"],
    "linear_w0.75": ["configs/ablations/linear_w0.75.yaml"],
}
PARTS = ("rewards", "multi", "objectives", "disentanglement")
TRAIN_TAGS = ("reward/mean", "reward/nssm", "reward/vsm", "reward/gated_fraction")
DOCS = {  # table: page
    "ablations-rewards": "ablations.md",
    "ablations-multi": "ablations.md",
    "ablations-disentanglement": "ablations.md",
    "ablations-objectives": "objectives.md",
}


def seed_args(seed: int) -> list[str]:
    return ["--seed_everything", str(seed), "--model.sampling.seed", str(objectives.SAMPLING_SEED + seed)]


class Ablations:
    """Runs (or finds finished) each run of the parts and returns its JSON entry."""

    def __init__(self, out: Path, fit_args: list[str], eval_args: list[str]):
        self.out, self.fit_args, self.eval_args = out, fit_args, eval_args

    def finished(self, folder: Path, config: dict) -> dict | None:
        """The entry of the finished run in ``folder`` made with ``config``; ``None`` after clearing an unfinished one."""
        path = folder / "run.json"
        if path.exists():
            entry = json.loads(path.read_text())
            if entry["config"] != config:
                raise SystemExit(
                    f"{folder} holds a run made with other arguments:\n  {entry['config']}\nnot\n  {config}\n"
                    "pass the same --fit-args/--eval-args, or another --out"
                )
            return entry
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return None

    def save(self, folder: Path, entry: dict) -> dict:
        (folder / "run.json").write_text(json.dumps(entry, indent=1))
        return entry

    def evaluate(self, config: list[str], method: str, weights: Path | None, folder: Path) -> dict:
        """``divrl evaluate`` of one method into ``folder/eval``; its ``overall`` metrics."""
        methods = json.dumps({method: None if weights is None else str(weights)})
        args = [*config, "--methods", methods, "--output_dir", str(folder / "eval"), "--progress", "false"]
        objectives.divrl(args, folder / "evaluate.log")
        return json.loads((folder / "eval/metrics.json").read_text())["methods"][method]["overall"]

    def train_and_evaluate(self, part: str, method: str, seed: int, fit: list[str], evaluate: list[str]) -> dict:
        folder = self.out / part / method / f"seed{seed}"
        config = {"fit": fit, "evaluate": evaluate}
        entry = self.finished(folder, config)
        if entry:
            return entry
        start = time.monotonic()
        objectives.divrl([*fit, "--trainer.default_root_dir", str(folder)], folder / "fit.log")
        logged = scalars(folder)
        metrics = {
            "eval": self.evaluate(evaluate, method, folder / "lora/final", folder),
            "val": validation(logged),
            "train": {tag: last_mean(logged[tag]) for tag in TRAIN_TAGS if tag in logged},
        }
        entry = {"part": part, "method": method, "seed": seed, "config": config, "metrics": metrics}
        return self.save(folder, {**entry, "seconds": round(time.monotonic() - start, 1)})

    def base_eval(self, part: str, eval_config: str) -> dict:
        """The base model's ``divrl evaluate`` (seed ``None``: its noise does not depend on the training seed)."""
        folder = self.out / part / "base" / "eval"
        evaluate = ["evaluate", "--config", eval_config, *self.eval_args]
        entry = self.finished(folder, {"evaluate": evaluate})
        if entry:
            return entry
        start = time.monotonic()
        overall = self.evaluate(evaluate, "base", None, folder)
        entry = {"part": part, "method": "base", "seed": None, "config": {"evaluate": evaluate}}
        return self.save(folder, {**entry, "metrics": {"eval": overall}, "seconds": round(time.monotonic() - start, 1)})

    def base_val(self, part: str, fit_config: str, seed: int) -> dict:
        """The base model's ``divrl validate`` on seed ``seed``'s validation noise: the curves' update 0."""
        folder = self.out / part / "base" / f"seed{seed}"
        validate = ["validate", "--config", fit_config, *seed_args(seed), *self.fit_args]
        entry = self.finished(folder, {"validate": validate})
        if entry:
            return entry
        start = time.monotonic()
        objectives.divrl([*validate, "--trainer.default_root_dir", str(folder)], folder / "validate.log")
        metrics = {"val": validation(scalars(folder), base=True)}
        entry = {"part": part, "method": "base", "seed": seed, "config": {"validate": validate}, "metrics": metrics}
        return self.save(folder, {**entry, "seconds": round(time.monotonic() - start, 1)})

    def rewards(self, methods: list[str], seeds: list[int]) -> list[dict]:
        entries = [self.base_eval("rewards", "configs/eval_demo.yaml")]
        for seed in seeds:  # seed by seed: an interrupted run leaves every method with the same seeds
            entries.append(self.base_val("rewards", "configs/demo.yaml", seed))
            for method in methods:
                configs = [a for path in REWARD_METHODS[method] for a in ("--config", path)]
                fit = ["fit", "--config", "configs/demo.yaml", *configs, *seed_args(seed), *self.fit_args]
                fit += ["--trainer.enable_progress_bar", "false"]
                evaluate = ["evaluate", "--config", "configs/eval_demo.yaml", *self.eval_args]
                entries.append(self.train_and_evaluate("rewards", method, seed, fit, evaluate))
        return entries

    def multi(self, seeds: list[int]) -> list[dict]:
        entries = [self.base_eval("multi", "configs/eval_demo_multi.yaml")]
        for seed in seeds:
            fit = ["fit", "--config", "configs/demo_multi.yaml", *seed_args(seed), *self.fit_args]
            fit += ["--trainer.enable_progress_bar", "false"]
            evaluate = ["evaluate", "--config", "configs/eval_demo_multi.yaml", *self.eval_args]
            entries.append(self.train_and_evaluate("multi", "psr_divrl", seed, fit, evaluate))
        return entries

    def objectives(self, seeds: list[int], budget: float, val_every: int) -> list[dict]:
        """``benchmarks/objectives.py``'s runs (resumable there), one entry per (objective, seed); ``config`` holds
        the commands and override configs as run, with the run's folder written ``<run>``."""
        out = self.out / "objectives"
        saved = objectives.run_all(out, list(objectives.METHODS), seeds, budget, val_every)
        entries = []
        for seed, points in saved["bases"].items():  # the base model's validations, ungated and gated
            config = {"budget": budget, "val_every": val_every, "validate": [], "overrides": []}
            for gated, name in ((False, "base"), (True, "base_gated")):
                if points["gated" if gated else "ungated"]:
                    folder = out / name / f"seed{seed}"
                    method = "idglow" if gated else "grpo"
                    config["validate"].append(portable(objectives.validate_command(folder, gated), folder))
                    config["overrides"].append(portable((folder / f"{method}.yaml").read_text(), folder))
            metrics = {
                k: {f: v for f, v in p.items() if f in objectives.POINT} if p else None for k, p in points.items()
            }
            seconds = round(sum(p["wall"] for p in points.values() if p), 1)
            entry = {"part": "objectives", "method": "base", "seed": int(seed), "config": config}
            entries.append({**entry, "metrics": metrics, "seconds": seconds})
        for method, runs in saved["curves"].items():
            for seed, curve in runs.items():
                folder = out / method / f"seed{seed}"
                config = {
                    "budget": budget,
                    "val_every": val_every,
                    "fit": portable(objectives.fit_command(folder, method), folder),
                    "overrides": portable((folder / f"{method}.yaml").read_text(), folder),
                }
                entry = {"part": "objectives", "method": method, "seed": int(seed), "config": config}
                entries.append({**entry, "metrics": {"curve": curve}, "seconds": saved["wall"][method][seed]})
        return entries


def portable(value, folder: Path):
    """``value`` (a string or a list of them) with ``folder`` written ``<run>`` and the repository root dropped."""
    if isinstance(value, list):
        return [portable(v, folder) for v in value]
    return value.replace(str(folder), "<run>").replace(f"{ROOT}/", "")


def validation(logged: dict, base: bool = False) -> dict:
    """Held-out ``val/*`` scalars by update count (``divrl validate``'s as update 0). Lightning logs an epoch-end
    validation at ``global_step - 1``, so the logged step ``s`` follows update ``s + 1``."""
    tags = sorted(t for t in logged if t.startswith("val/") and not t.endswith("_std"))
    steps = sorted({step for tag in tags for step, _ in logged[tag]})
    return {
        "updates": [0] if base else [s + 1 for s in steps],
        **{tag[4:]: [dict(logged[tag]).get(s) for s in steps] for tag in tags},
    }


def last_mean(series: list[tuple[int, float]], count: int = 10) -> float:
    """Mean of the last ``count`` logged values (the training rollouts' level at the end of the run)."""
    values = [v for _, v in sorted(dict(series).items())][-count:]
    return sum(values) / len(values)


def generated_samples(out: Path, seeds: list[int]) -> dict[str, list[Path]]:
    """The evaluated samples of the base model and of DivRL at ``seeds`` (``<method>/scores.jsonl`` folders) under
    ``out``'s rewards part, for the disentanglement part; empty when that part has not run."""
    found = {"base": [out / "rewards/base/eval/eval/base"]}
    found["divrl"] = [out / f"rewards/divrl/seed{seed}/eval/divrl" for seed in seeds]
    return {label: [f for f in folders if (f / "scores.jsonl").exists()] for label, folders in found.items()}


def merge(path: Path, entries: list[dict], disentanglement: dict | None) -> dict:
    """The JSON at ``path`` with ``entries`` replacing those of the same (part, method, seed), and each part's wall
    time: the sum of its runs' seconds, however many invocations they took."""
    saved = json.loads(path.read_text()) if path.exists() else {"runs": []}
    settings = {(e["part"], e["method"], e["seed"] is None): settings_of(e) for e in entries}
    for old in saved["runs"]:  # one table must not average runs made with other settings
        new = settings.get((old["part"], old["method"], old["seed"] is None))
        if new is not None and settings_of(old) != new:
            raise SystemExit(
                f"{path} holds {old['part']}/{old['method']} runs made with other settings than this one's "
                f"(seed {old['seed']}: {old['config']}); pass another --json, or remove those runs from it"
            )
    keys = {(e["part"], e["method"], e["seed"]) for e in entries}
    runs = [e for e in saved["runs"] if (e["part"], e["method"], e["seed"]) not in keys] + entries
    order = {part: i for i, part in enumerate(PARTS)}
    runs.sort(key=lambda e: (order[e["part"]], e["method"], -1 if e["seed"] is None else e["seed"]))
    disentanglement = disentanglement or saved.get("disentanglement")
    wall = {part: round(sum(e["seconds"] for e in runs if e["part"] == part)) for part in PARTS[:3]}
    wall["disentanglement"] = round(disentanglement["seconds"]) if disentanglement else 0
    return {"runs": runs, "disentanglement": disentanglement, "wall_seconds": wall}


def settings_of(entry: dict) -> str:
    """An entry's ``config`` with its seed taken out: equal for two seeds of the same method and settings."""
    text = json.dumps(entry["config"])
    seed = entry["seed"]
    if seed is None:
        return text
    for value in (f'"--seed_everything", "{seed}"', f'"--model.sampling.seed", "{objectives.SAMPLING_SEED + seed}"'):
        text = text.replace(value, value.split(",")[0] + ', "<seed>"')
    text = text.replace(f"seed_everything: {seed}\\n", "seed_everything: <seed>\\n")
    return text.replace(f"seed: {objectives.SAMPLING_SEED + seed}\\n", "seed: <seed>\\n")


def selection(only: str | None) -> tuple[set[str], list[str]]:
    """The parts and the reward methods ``--only`` names (all by default)."""
    if not only:
        return set(PARTS), list(REWARD_METHODS)
    names = only.split(",")
    unknown = [n for n in names if n not in PARTS and n not in REWARD_METHODS]
    if unknown:
        raise SystemExit(
            f"--only {only}: unknown {unknown}; name parts {list(PARTS)} or methods {list(REWARD_METHODS)}"
        )
    methods = [m for m in REWARD_METHODS if m in names or "rewards" in names]
    return {n for n in names if n in PARTS} | ({"rewards"} if methods else set()), methods


def publish(saved: dict, figures: Path, docs: Path | None) -> None:
    """Print the tables, draw the figures into ``figures``; with ``docs``, write the tables into its pages."""
    tables = report.tables(saved)
    for name, body in tables.items():
        print(f"{name}:\n{body}\n")
    report.figures(saved, figures)
    if docs is not None:
        rebuilt = report.objectives_saved(saved)
        if rebuilt:  # objectives.py's own file: `objectives.py --replot docs/objectives.json` redraws its figure
            table, pairs = objectives.summary(rebuilt)
            (docs / "objectives.json").write_text(json.dumps({**rebuilt, "table": table, "pairs": pairs}, indent=1))
        for name, body in tables.items():
            page = docs / DOCS[name]
            page.write_text(replace_block(page.read_text(), name, body, page=str(page)))
        print("wrote the tables into " + ", ".join(sorted({f"docs/{DOCS[n]}" for n in tables})))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--only", help=f"comma-separated parts {list(PARTS)} or reward methods (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations", help="run folders (resumable)")
    parser.add_argument("--json", type=Path, help="results file (default <out>/ablations.json)")
    parser.add_argument("--figures", type=Path, help="folder of the figures (default: the JSON's folder)")
    parser.add_argument("--write-docs", action="store_true", help="JSON, figures and tables into docs/")
    parser.add_argument("--replot", action="store_true", help="run nothing: tables and figures from --json")
    parser.add_argument("--fit-args", default="", help="extra `divrl fit`/`validate` arguments (smaller runs)")
    parser.add_argument("--eval-args", default="", help="extra `divrl evaluate` arguments (smaller evaluations)")
    parser.add_argument("--objectives-budget", type=float, default=60.0, help="training seconds per objective")
    parser.add_argument("--objectives-val-every", type=int, default=10, help="objectives: validate every N batches")
    parser.add_argument("--dreambooth", type=Path, default=ROOT.parent / "shared/datasets/dreambooth")
    args = parser.parse_args()
    docs = ROOT / "docs" if args.write_docs else None
    json_path = args.json or (docs / "ablations.json" if docs else args.out / "ablations.json")
    figures = args.figures or json_path.parent
    if docs is not None:
        for name, page in DOCS.items():  # every marker in place before anything runs
            replace_block((docs / page).read_text(), name, "", page=f"docs/{page}")
    if args.replot:
        publish(json.loads(json_path.read_text()), figures, docs)
        return
    parts, methods = selection(args.only)
    if "objectives" in parts and (args.fit_args or args.eval_args):
        parser.error(
            "--fit-args and --eval-args apply to the rewards and multi parts; the objectives part trains for "
            "--objectives-budget seconds: leave it out with --only"
        )
    seeds = [int(s) for s in args.seeds.split(",")]
    ablations = Ablations(args.out.resolve(), shlex.split(args.fit_args), shlex.split(args.eval_args))
    entries, disentanglement, clock = [], None, {}
    for part in PARTS:
        if part not in parts:
            continue
        start = time.monotonic()
        if part == "rewards":
            entries += ablations.rewards(methods, seeds)
        elif part == "multi":
            entries += ablations.multi(seeds)
        elif part == "objectives":
            entries += ablations.objectives(seeds, args.objectives_budget, args.objectives_val_every)
        else:
            from disentanglement import measure

            disentanglement = measure(ROOT / "data/demo", generated_samples(args.out.resolve(), seeds), args.dreambooth)
            disentanglement["seconds"] = round(time.monotonic() - start, 1)
        clock[part] = time.monotonic() - start
        print(f"{part}: {clock[part] / 60:.1f} min", flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    saved = merge(json_path, entries, disentanglement)
    json_path.write_text(json.dumps(saved, indent=1))
    publish(saved, figures, docs)
    wall = saved["wall_seconds"]
    print(f"wrote {json_path}; this invocation {sum(clock.values()) / 60:.1f} min; the whole set's runs took")
    print(", ".join(f"{part} {s / 60:.1f} min" for part, s in wall.items()) + f": {sum(wall.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()

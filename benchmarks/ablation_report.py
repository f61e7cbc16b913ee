"""Tables and figures of ``benchmarks/ablations.py``, as pure functions of its JSON (``--replot`` redraws them).

Every number is a mean ± sample sd over the training seeds, with the number of seeds; a method's difference from
DivRL counts as larger than the spread when the two means differ by more than the two sds added.
"""

from __future__ import annotations

from pathlib import Path

import objectives
from objectives import mean_sd

LABELS = {
    "base": "base model",
    "divrl": "DivRL (R1 → R2)",
    "nssm_only": "nSSM only",
    "vsm_only": "VSM only",
    "linear_w0.25": "linear, w = 0.25",
    "linear_w0.5": "linear, w = 0.5",
    "linear_w0.75": "linear, w = 0.75",
    "psr_divrl": "PSR + per-subject DivRL",
}
COLOURS = {method: f"C{i}" for i, method in enumerate(LABELS)}  # one colour per method in every figure
FIG5 = ("divrl", "nssm_only", "vsm_only")
FIG6 = ("divrl", "linear_w0.25", "linear_w0.5", "linear_w0.75")
REWARD_COLUMNS = {  # metrics.json key: header
    "vsm": "VSM-0.7 ↑",
    "mtg_nssm": "MTG-nSSM ↑",
    "si_iou": "si-IoU ↓",
    "consistency_ratio": "consistency ratio ↑",
    "diversity_over_consistency": "diversity over consistency ↑",
}
MULTI_COLUMNS = {
    "sc": "SC ↑",
    "found": "found ↑",
    "subject_vsm": "VSM/subject ↑",
    "subject_nssm": "nSSM/subject ↑",
    "consistency_ratio": "consistency ratio ↑",
    "diversity_over_consistency": "diversity over consistency ↑",
}


def runs_of(saved: dict, part: str) -> dict[str, list[dict]]:
    """``{method: [entry, ...]}`` of one part, trained runs by seed; the base model's one shared evaluation."""
    methods: dict[str, list[dict]] = {}
    for entry in saved["runs"]:
        if entry["part"] == part and (entry["method"] != "base" or entry["seed"] is None):
            methods.setdefault(entry["method"], []).append(entry)
    return methods


def eval_table(runs: dict[str, list[dict]], columns: dict[str, str], order: list[str]) -> str:
    """One row per method: each ``divrl evaluate`` column as mean ± sd over seeds, and the number of seeds."""
    lines = ["| method | " + " | ".join(columns.values()) + " | seeds |", "| --- " * (len(columns) + 2) + "|"]
    for method in [m for m in order if m in runs]:
        cells = []
        for key in columns:
            column = values(runs[method], key)
            mean, sd = mean_sd(column) if column else (None, None)
            cells.append("—" if mean is None else f"{mean:.3f}" if len(column) == 1 else f"{mean:.3f} ± {sd:.3f}")
        n = len(runs[method])
        seeds = "1 evaluation" if method == "base" else str(n)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def values(entries: list[dict], key: str) -> list[float]:
    """One evaluation column over runs, leaving out runs where it is missing."""
    return [e["metrics"]["eval"][key] for e in entries if e["metrics"]["eval"].get(key) is not None]


def against(runs: dict[str, list[dict]], reference: str, keys: tuple[str, ...]) -> list[str]:
    """For every other trained method, its gap to ``reference`` on ``keys``, marked when larger than the spread."""
    lines = []
    for method in [m for m in LABELS if m in runs and m not in (reference, "base")]:
        parts = []
        for key in keys:
            a, b = (mean_sd(values(runs[m], key)) for m in (reference, method))
            gap = b[0] - a[0]
            verdict = "larger than the spread" if abs(gap) > a[1] + b[1] else "within the spread"
            parts.append(f"{key.replace('_', ' ')} {gap:+.3f} ({verdict})")
        lines.append(f"- {LABELS[method]} against {LABELS[reference]}: " + "; ".join(parts))
    return lines


def objectives_saved(saved: dict) -> dict | None:
    """``benchmarks/objectives.py``'s results rebuilt from the objectives entries (its table and plot read them)."""
    entries = [e for e in saved["runs"] if e["part"] == "objectives" and e["method"] != "base"]
    if not entries:
        return None
    curves: dict[str, dict] = {}
    for entry in entries:
        curves.setdefault(entry["method"], {})[str(entry["seed"])] = entry["metrics"]["curve"]
    seeds = sorted({e["seed"] for e in entries})
    bases = {str(e["seed"]): e["metrics"] for e in saved["runs"] if e["part"] == "objectives" and e["method"] == "base"}
    config = entries[0]["config"]
    if len({(e["config"]["budget"], e["config"]["val_every"]) for e in entries}) > 1:
        raise ValueError("the objectives runs were made with different --objectives-budget or --objectives-val-every")
    order = [m for m in objectives.METHODS if m in curves]
    return {
        "budget": config["budget"],
        "val_every": config["val_every"],
        "seeds": seeds,
        "bases": bases,
        "curves": {m: curves[m] for m in order},
    }


def tables(saved: dict) -> dict[str, str]:
    """The markdown tables of the parts present in ``saved``: ``{marker name: body}``."""
    out = {}
    rewards = runs_of(saved, "rewards")
    if rewards:
        body = eval_table(rewards, REWARD_COLUMNS, list(LABELS))
        keys = ("consistency_ratio", "diversity_over_consistency")
        if "divrl" in rewards:
            body += "\n\nEach method against DivRL (mean gap; the spread is the two sds added):\n\n"
            body += "\n".join(against(rewards, "divrl", keys))
        out["ablations-rewards"] = body
    multi = runs_of(saved, "multi")
    if multi:
        out["ablations-multi"] = eval_table(multi, MULTI_COLUMNS, ["base", "psr_divrl"])
    rebuilt = objectives_saved(saved)
    if rebuilt:
        out["ablations-objectives"] = objectives.markdown(rebuilt)
    if saved.get("disentanglement"):
        from disentanglement import table

        out["ablations-disentanglement"] = table(saved["disentanglement"])
    return out


def figures(saved: dict, folder: Path) -> list[Path]:
    """Draw the figures of the parts present into ``folder``; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    rewards = [e for e in saved["runs"] if e["part"] == "rewards"]
    if rewards:
        written += [
            curves(rewards, folder / "ablations_curves.png"),
            frontier(rewards, folder / "ablations_frontier.png"),
        ]
    rebuilt = objectives_saved(saved)
    if rebuilt:
        objectives.plot(rebuilt, folder / "objectives.png")
        written.append(folder / "objectives.png")
    if saved.get("disentanglement"):
        from disentanglement import plot

        written.append(plot(saved["disentanglement"], folder / "ablations_disentanglement.png"))
    return written


def curves(entries: list[dict], path: Path) -> Path:
    """Fig. 5 and Fig. 6 (left): held-out nSSM and VSM against updates, mean ± sd over seeds (each seed's base
    validation as update 0)."""
    import matplotlib.pyplot as plt

    base = {e["seed"]: e["metrics"]["val"] for e in entries if e["method"] == "base" and e["seed"] is not None}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, (methods, title) in enumerate(((FIG5, "Fig. 5: each reward alone"), (FIG6, "Fig. 6: gated vs linear"))):
        for col, key in enumerate(("nssm", "vsm")):
            ax = axes[row, col]
            for method in methods:
                runs = [e for e in entries if e["method"] == method]
                if not runs:
                    continue
                series = []
                for e in runs:
                    val = e["metrics"]["val"]
                    start = base.get(e["seed"])
                    points = ([(0, start[key][0])] if start else []) + list(zip(val["updates"], val.get(key, [])))
                    series.append({u: v for u, v in points if v is not None})
                updates = sorted({u for s in series for u in s})  # a point's mean and sd over the seeds that have it
                at = [[s[u] for s in series if u in s] for u in updates]
                mean, sd = [mean_sd(v)[0] for v in at], [mean_sd(v)[1] for v in at]
                colour = COLOURS[method]
                ax.plot(updates, mean, marker="o", ms=3, color=colour, label=f"{LABELS[method]} (n = {len(runs)})")
                low, high = [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
                ax.fill_between(updates, low, high, color=colour, alpha=0.15, lw=0)
            ax.set_title(f"{title}: held-out {'nSSM' if key == 'nssm' else 'VSM'}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if row == 1:
                ax.set_xlabel("optimizer updates")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def frontier(entries: list[dict], path: Path) -> Path:
    """Fig. 6 (right): consistency ratio against diversity over consistency, one small point per run and the mean
    per method with its sd as error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    keys = ("consistency_ratio", "diversity_over_consistency")
    for method in (m for m in LABELS if any(e["method"] == m for e in entries)):
        runs = [
            e["metrics"]["eval"] for e in entries if e["method"] == method and (method != "base" or e["seed"] is None)
        ]
        x, y = ([r[k] for r in runs] for k in keys)
        colour = COLOURS[method]
        ax.scatter(x, y, s=12, color=colour, alpha=0.5)
        (mx, sx), (my, sy) = mean_sd(x), mean_sd(y)
        marker = "*" if method == "base" else "o"
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt=marker, ms=9, color=colour, capsize=3, label=LABELS[method])
    ax.set_xlabel("consistency ratio (VSM-0.7 > 0.6) →")
    ax.set_ylabel("diversity over consistency (MTG-nSSM) →")
    ax.set_title("Fig. 6 (right): the frontier on the CPU demo, mean ± sd over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path

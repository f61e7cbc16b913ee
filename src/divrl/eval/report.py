"""Reports of an evaluation: the Table 1 markdown, the trade-off (frontier) plot and per-method sample grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from divrl.images import caption_grid, to_image_batch

__all__ = ["write_table", "plot_frontier", "method_grid"]


def _cell(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_table(metrics: dict, suite, path: str | Path) -> str:
    """``table.md``: one row per method, the configured columns in the paper's Table 1 order, then the trade-off
    point; a per-category table; and which model computed each column. Returns the markdown."""
    columns = metrics["protocol"]["columns"]
    protocol = metrics["protocol"]
    trade = [
        f"cons. ratio ({protocol['consistency_metric']} > {protocol['consistency_threshold']:g}) ↑",
        f"div/cons ({protocol['diversity_metric']}) ↑",
    ]
    headers = ["method"] + [suite.header(c) for c in columns] + trade + ["samples"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, result in metrics["methods"].items():
        o = result["overall"]
        cells = [name] + [_cell(o[c]) for c in columns]
        cells += [_cell(o["consistency_ratio"]), _cell(o["diversity_over_consistency"]), str(o["samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    out = ["# Evaluation", "", *lines, ""]
    categories = sorted({c for r in metrics["methods"].values() for c in r["by_category"]})
    if len(categories) > 1:
        out += ["## By category", ""]
        cat_headers = ["method", "category"] + [suite.header(c) for c in columns] + trade
        out += ["| " + " | ".join(cat_headers) + " |", "|" + "---|" * len(cat_headers)]
        for name, result in metrics["methods"].items():
            for category, o in result["by_category"].items():
                cells = [name, category] + [_cell(o[c]) for c in columns]
                cells += [_cell(o["consistency_ratio"]), _cell(o["diversity_over_consistency"])]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    skipped = ", ".join(protocol["identity_skip_categories"]) or "none"
    out += [
        "## Protocol",
        "",
        f"- {protocol['num_samples']} samples per (identity, prompt), noise seed {protocol['seed']}.",
        f"- Categories left out of VSM and MTG-nSSM: {skipped}. A dash: no model configured, or no sample covered.",
        f"- Consistency ratio: share of samples with {protocol['consistency_metric']} > "
        f"{protocol['consistency_threshold']:g}; div/cons: mean {protocol['diversity_metric']} over those samples.",
        "- Models:",
        *[f"  - {suite.header(c)}: {protocol['models'][c]}" for c in columns],
        "",
    ]
    text = "\n".join(out)
    Path(path).write_text(text)
    return text


def plot_frontier(metrics: dict, path: str | Path) -> None:
    """``frontier.png``: consistency ratio (x) against diversity over consistency (y), one labelled point per
    method (the paper's Figs. 3 and 6). Methods without a defined point are listed under the plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    protocol = metrics["protocol"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    missing = []
    for name, result in metrics["methods"].items():
        x = result["overall"]["consistency_ratio"]
        y = result["overall"]["diversity_over_consistency"]
        if x is None or y is None:
            missing.append(name)
            continue
        ax.scatter([x], [y], s=60, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel(f"consistency ratio ({protocol['consistency_metric']} > {protocol['consistency_threshold']:g})")
    ax.set_ylabel(f"diversity over consistency (mean {protocol['diversity_metric']})")
    ax.set_title("identity–diversity trade-off (up and right is better)")
    ax.grid(True, alpha=0.3)
    ax.margins(0.25)
    if missing:
        fig.text(0.01, 0.01, f"no consistent sample: {', '.join(missing)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def method_grid(name: str, groups: Sequence[tuple], suite, tile: int = 128) -> Image.Image:
    """One block per condition: its references, then its samples captioned with the identity and diversity scores."""
    identity, diversity = suite.consistency_metric, suite.diversity_metric
    label = {"subject_nssm": "nSSM", "subject_vsm": "VSM"}.get(diversity, diversity.split("_")[0])
    blocks = []
    for condition, images, rows in groups:
        references = condition.as_sample().references
        tiles = [to_image_batch(r)[0] for r in references] + list(images)
        names = ["reference"] if len(references) == 1 else [f"reference {k + 1}" for k in range(len(references))]
        captions = names + [
            f"{identity} {_cell(r.get(identity), 2)} {label} {_cell(r.get(diversity), 2)}" for r in rows
        ]
        title = f"{name}: {condition.id} / {condition.prompt}"
        blocks.append(caption_grid(title, tiles, captions, tile=tile, columns=len(tiles)))
    width = max(b.width for b in blocks)
    canvas = Image.new("RGB", (width, sum(b.height for b in blocks)), "white")
    y = 0
    for block in blocks:
        canvas.paste(block, (0, y))
        y += block.height
    return canvas

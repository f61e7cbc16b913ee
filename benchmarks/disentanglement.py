"""Are nSSM and VSM disentangled? Both scores on pairs (reference, image) whose identity and layout are known.

Each dataset's pairs are scored with ``divrl evaluate``'s identity columns (:meth:`divrl.eval.EvalSuite.score_group`:
VSM-0.7 and MTG-nSSM, no pooling), on every feature backbone available offline (the weight-free dense descriptor;
DINOv2-small too where it is in the local Hugging Face cache). The categories:

- ``other pose`` / ``other photo``: the same subject in another pose (the demo world's target images, drawn in the
  poses the prompts ask for) or another DreamBooth photo of it: identity kept, layout changed;
- ``other subject``: another identity's reference: identity and layout changed;
- ``mirrored``: the reference flipped left-right: identity kept, layout changed (exactly);
- ``recoloured``: the reference with its hues rotated 120° about the grey axis: layout kept, appearance changed;
- ``generated: base`` / ``generated: DivRL``: the evaluated samples of the base model and of DivRL's seeds
  (``benchmarks/ablations.py``'s rewards part), against their own reference.

Disentangled scores would give: VSM high for the identity-keeping categories and low for ``other subject`` and
``recoloured`` (an AUC near 1 between ``other pose/photo`` and ``other subject``), nSSM high wherever the layout
changes and low for ``recoloured``, whatever the identity, and little correlation between the two.

Run on its own:  python benchmarks/disentanglement.py [--out runs/disentanglement] (no trained runs needed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAME = {"demo": "other pose", "dreambooth": "other photo"}
DREAMBOOTH_SIDE = 384  # photos resized square, as tests/test_real_photos.py


IDENTITY = yaml.safe_load((ROOT / "configs/eval_demo.yaml").read_text())["suite"]["init_args"]["identity"]


def backbones() -> tuple[dict, list[str]]:
    """``{name: backbone}`` available offline and a sentence per backbone that is not."""
    from divrl.rewards.backbones import DenseDescriptor, DINOv2Backbone

    found = {"dense descriptor": DenseDescriptor(**IDENTITY["init_args"]["backbone"]["init_args"])}
    missing = []
    try:
        found["DINOv2-small"] = DINOv2Backbone("facebook/dinov2-small", grid_size=24, local_files_only=True)
    except (OSError, ValueError) as err:
        missing.append(f"DINOv2-small: not in the local cache ({type(err).__name__})")
    return found, missing


def suite(backbone):
    """``divrl evaluate``'s identity columns as configs/eval_demo.yaml sets them, on ``backbone``."""
    from divrl.eval import EvalSuite
    from divrl.rewards import FeatureScorer

    settings = {k: v for k, v in IDENTITY["init_args"].items() if k != "backbone"}
    return EvalSuite(identity=FeatureScorer(backbone, **settings))


def recolour(images: torch.Tensor, degrees: float = 120.0) -> torch.Tensor:
    """Rotate every colour about the grey axis (Rodrigues): hues change, brightness and layout do not."""
    axis = torch.full((3,), 1 / math.sqrt(3))
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = math.radians(degrees)
    rotation = torch.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
    return torch.einsum("ij,bjhw->bihw", rotation, images).clamp(0, 1)


def demo_identities(data: Path) -> dict[str, dict]:
    """Every identity of the demo shards (train and held-out, read as training reads them): reference, mask, first
    prompt and target images as tensors."""
    from divrl.data.stream import SkipCounter, read_identities
    from divrl.images import to_image_batch, to_mask_batch

    out = {}
    for record in read_identities([str(p) for p in sorted(data.glob("*.tar"))], SkipCounter(max_consecutive=1)):
        targets = [to_image_batch(record.targets[p]) for p in sorted(record.targets)]
        out[record.id] = {
            "reference": to_image_batch(record.references[0]),
            "mask": to_mask_batch(record.masks[0]),
            "prompt": record.prompts[0],
            "targets": torch.cat(targets) if targets else None,
        }
    return out


def score(scorer, reference, images, prompt: str, mask=None) -> list[tuple[float, float]]:
    scores = scorer.score_group(reference, images, prompt, ref_mask=mask)
    return [(round(n, 4), round(v, 4)) for n, v in zip(scores["mtg_nssm"], scores["vsm"])]


def demo_pairs(scorer, data: Path, generated: dict[str, list[Path]]) -> dict[str, list]:
    """The demo world's categories: ``{category: [(nSSM, VSM), ...]}``."""
    from divrl.images import to_image_batch

    identities = demo_identities(data)
    pairs: dict[str, list] = {SAME["demo"]: [], "other subject": [], "mirrored": [], "recoloured": []}
    keys = sorted(identities)
    for key in keys:
        item = identities[key]
        ref, mask, prompt = item["reference"], item["mask"], item["prompt"]
        others = torch.cat([identities[k]["reference"] for k in keys if k != key])
        batches = {"other subject": others, "mirrored": ref.flip(-1), "recoloured": recolour(ref)}
        if item["targets"] is not None:
            batches[SAME["demo"]] = item["targets"]
        for category, images in batches.items():
            pairs[category] += score(scorer, ref, images, prompt, mask)
    for label, folders in generated.items():
        name = f"generated: {'DivRL' if label == 'divrl' else label}"
        for folder in folders:
            rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines() if line]
            for key in sorted({r["id"] for r in rows}):
                mine = [r for r in rows if r["id"] == key]
                images = torch.cat([to_image_batch(folder / r["file"]) for r in mine])
                item = identities[key]
                pairs.setdefault(name, []).extend(
                    score(scorer, item["reference"], images, mine[0]["prompt"], item["mask"])
                )
    return pairs


def dreambooth_pairs(scorer, root: Path) -> dict[str, list]:
    """DreamBooth's categories (no masks: the whole photo): photo 00 of each subject against the others."""
    from divrl.images import to_image_batch

    def load(path: Path) -> torch.Tensor:
        image = to_image_batch(path)
        return F.interpolate(image, size=(DREAMBOOTH_SIDE,) * 2, mode="bilinear", antialias=True)

    subjects = sorted(p for p in root.iterdir() if p.is_dir())
    photos = {s.name: [load(p) for p in sorted(s.glob("*.jpg"))] for s in subjects}
    pairs: dict[str, list] = {SAME["dreambooth"]: [], "other subject": [], "mirrored": [], "recoloured": []}
    for name, own in photos.items():
        ref = own[0]
        batches = {"other subject": torch.cat([p[0] for n, p in photos.items() if n != name])}
        batches.update({"mirrored": ref.flip(-1), "recoloured": recolour(ref)})
        if len(own) > 1:  # a subject with one photo has no other photo
            batches[SAME["dreambooth"]] = torch.cat(own[1:])
        for category, images in batches.items():
            pairs[category] += score(scorer, ref, images, f"a photo of {name}")
    return pairs


def measure(data: Path, generated: dict[str, list[Path]], dreambooth: Path | None) -> dict:
    """Every dataset × backbone's pairs: ``{"results": [{dataset, backbone, pairs}], "unavailable": [...]}``."""
    found, missing = backbones()
    results = []
    for name, backbone in found.items():
        scorer = suite(backbone)
        results.append({"dataset": "demo", "backbone": name, "pairs": demo_pairs(scorer, data, generated)})
        if dreambooth is not None and dreambooth.is_dir():
            results.append({"dataset": "dreambooth", "backbone": name, "pairs": dreambooth_pairs(scorer, dreambooth)})
    if dreambooth is None or not dreambooth.is_dir():
        missing.append(f"DreamBooth photos: {dreambooth} not found")
    return {"results": results, "unavailable": missing}


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U over n1·n2); NaN when a side
    is empty."""
    if not positive or not negative:
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def pearson(pairs: list[tuple[float, float]]) -> float | None:
    """Pearson r between the pairs' nSSM and VSM; ``None`` for fewer than 3 pairs or a constant score."""
    from scipy.stats import pearsonr

    first, second = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(pairs) < 3 or len(set(first)) < 2 or len(set(second)) < 2:
        return None
    return float(pearsonr(first, second).statistic)


def summary(result: dict) -> dict:
    """One dataset × backbone: AUCs, correlations and per-category means and sds."""
    pairs = {c: v for c, v in result["pairs"].items() if v}  # categories with pairs
    same = SAME[result["dataset"]]
    everything = [p for values in pairs.values() for p in values]
    generated = [p for c, values in pairs.items() if c.startswith("generated") for p in values]
    column = lambda c, i: [p[i] for p in pairs.get(c, [])]  # noqa: E731
    return {
        "vsm_auc": auc(column(same, 1), column("other subject", 1)),
        "nssm_auc": auc(column(same, 0), column("other subject", 0)),
        "r_all": pearson(everything),
        "r_generated": pearson(generated),
        "categories": {
            c: {
                "n": len(v),
                "nssm": (statistics.mean(column(c, 0)), statistics.stdev(column(c, 0)) if len(v) > 1 else 0.0),
                "vsm": (statistics.mean(column(c, 1)), statistics.stdev(column(c, 1)) if len(v) > 1 else 0.0),
                "r": pearson(v),
            }
            for c, v in pairs.items()
        },
    }


def table(saved: dict) -> str:
    """Markdown: one row per dataset × backbone × category, then the AUCs and correlations."""
    lines = ["| dataset | backbone | pairs | n | MTG-nSSM | VSM-0.7 | r(nSSM, VSM) |", "| --- " * 7 + "|"]
    notes = []
    for result in saved["results"]:
        s = summary(result)
        for category, c in s["categories"].items():
            lines.append(
                f"| {result['dataset']} | {result['backbone']} | {category} | {c['n']} | "
                "{:.3f} ± {:.3f} | {:.3f} ± {:.3f} | ".format(*c["nssm"], *c["vsm"])
                + ("—" if c["r"] is None else f"{c['r']:+.2f}")
                + " |"
            )
        generated = "" if s["r_generated"] is None else f", over the generated samples {s['r_generated']:+.2f}"
        notes.append(
            f"- {result['dataset']}, {result['backbone']}: {SAME[result['dataset']]} against other subject, "
            f"AUC of VSM {s['vsm_auc']:.2f}, of nSSM {s['nssm_auc']:.2f}; Pearson r(nSSM, VSM) over all pairs "
            f"{s['r_all']:+.2f}{generated}"
        )
    notes += [f"- not measured: {m}" for m in saved.get("unavailable", [])]
    return "\n".join(lines) + "\n\nMean ± sd over the pairs.\n\n" + "\n".join(notes)


def plot(saved: dict, path: Path) -> Path:
    """Per dataset × backbone: nSSM against VSM, one point per pair, coloured by category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = saved["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    for ax, result in zip(axes[0], results):
        for i, (category, values) in enumerate(result["pairs"].items()):
            ax.scatter([v[0] for v in values], [v[1] for v in values], s=6, alpha=0.5, color=f"C{i}", label=category)
        ax.set_title(f"{result['dataset']}: {result['backbone']}", fontsize=10)
        ax.set_xlabel("MTG-nSSM (structure differs from the reference) →")
        ax.set_ylabel("VSM-0.7 (identity matches) →")
        ax.set_xlim(-0.05, 1.35)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "disentanglement")
    parser.add_argument("--dreambooth", type=Path, default=ROOT.parent / "shared/datasets/dreambooth")
    parser.add_argument("--ablations", type=Path, help="benchmarks/ablations.py's --out, for the generated samples")
    parser.add_argument("--seeds", default="0,1,2", help="the DivRL seeds whose samples to score (default 0,1,2)")
    args = parser.parse_args()
    generated = {}
    if args.ablations:
        from ablations import generated_samples

        generated = generated_samples(args.ablations.resolve(), [int(s) for s in args.seeds.split(",")])
    saved = measure(ROOT / "data/demo", generated, args.dreambooth)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disentanglement.json").write_text(json.dumps(saved))
    plot(saved, args.out / "disentanglement.png")
    print(table(saved))


if __name__ == "__main__":
    main()

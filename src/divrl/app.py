"""``divrl app``: look at a trained model in the browser (Gradio, the ``app`` extra).

Upload one reference per subject (and, optionally, their masks), type a prompt, pick the seed, the number of samples
and of steps: the base model's samples and the trained ones come side by side, each captioned with its reward
components, and a table lists the numbers. When the run has several exports (``lora/stage1``, ``lora/final``) a
slider picks one.

:class:`Studio` is the engine, without Gradio: it builds the model from the run's configuration as ``divrl sample``
does and samples through the same function (:func:`divrl.training.trainer.sample_condition`), so an image and its
scores equal ``divrl sample``'s for the same reference, prompt, seed and steps. :func:`build_app` is the page.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Studio", "Comparison", "build_app"]


@dataclass
class Comparison:
    """The base model's and the trained model's samples of one request, with their scores.

    Attributes:
        base, trained: ``(N, 3, H, W)`` images in [0, 1].
        base_scores, trained_scores: per sample, ``{"reward": r, <component>: value, ...}``.
        weights: the name of the trained weights used (``final``, ``stage1``).
        stage: the (1-based) stage whose reward scored both.
    """

    base: torch.Tensor
    trained: torch.Tensor
    base_scores: list[dict[str, float]]
    trained_scores: list[dict[str, float]]
    weights: str
    stage: int


class Studio:
    """A run's model, ready to sample with and without its trained weights.

    Args:
        config: the run's configuration (its ``config.yaml``, or the training config).
        weights: name → LoRA folder, in the order the slider shows them (``{"stage1": ..., "final": ...}``).
        overrides: further command-line settings (``["--model.policy.model", "path"]``).
    """

    def __init__(self, config: str | os.PathLike, weights: dict[str, Path], overrides: list[str] | tuple = ()):
        import yaml

        from divrl.export import sampling_config
        from divrl.lightning_cli import run_lightning

        if not weights:
            raise ValueError("divrl app needs at least one trained LoRA (--lora)")
        self.weights = dict(weights)
        saved = yaml.safe_load(Path(config).read_text()) or {}
        settings = yaml.safe_dump(sampling_config(saved, one_device=True, where=str(config)), sort_keys=False)
        cli = run_lightning(["--config", settings, *overrides], run=False)  # no subcommand
        self.model = cli.model
        self.model.configure_model()
        self.model.to(cli.trainer.strategy.root_device).eval()
        self.loaded: str | None = None
        self.lock = threading.Lock()  # one request at a time: the model holds one adapter

    def use(self, name: str) -> None:
        """Load the weights ``name`` (a no-op when they are loaded)."""
        from divrl.training.checkpoints import load_weights

        if name not in self.weights:
            raise ValueError(f"no trained weights named {name!r}; this run has {list(self.weights)}")
        if self.loaded != name:
            load_weights(self.model, self.weights[name])
            self.model.eval()  # as divrl sample: loading may leave modules in training mode
            self.loaded = name

    def compare(
        self,
        references: list[str | os.PathLike],
        prompt: str,
        masks: list[str | os.PathLike | None] | None = None,
        seed: int = 0,
        num_samples: int = 4,
        num_steps: int = 28,
        weights: str | None = None,
    ) -> Comparison:
        """Sample ``prompt`` on ``references`` with the base model and with ``weights`` (default: the last), as
        ``divrl sample --reference ... --prompts [prompt] --seed seed --num_samples ... --num_steps ...`` does."""
        from divrl.training.inputs import at_least_one, conditions
        from divrl.training.trainer import sample_condition

        at_least_one(num_samples=num_samples, num_steps=num_steps)
        if not references:
            raise ValueError("upload at least one reference image")
        if not prompt or not prompt.strip():
            raise ValueError("type a prompt")
        files = [str(f) for f in references]
        given = [None if m is None else str(m) for m in (masks or [])]
        if given and len(given) != len(files):
            raise ValueError(
                f"{len(files)} reference(s) and {len(given)} mask(s): give one mask per reference, or none"
            )
        condition = conditions(None, files if len(files) > 1 else files[0], [prompt], given or None, 1)[0]
        name = weights or list(self.weights)[-1]
        with self.lock, torch.no_grad():
            self.use(name)
            trained, trained_scores = sample_condition(self.model, condition, 0, num_samples, seed, num_steps)
            with self.model.policy.adapter_disabled():
                base, base_scores = sample_condition(self.model, condition, 0, num_samples, seed, num_steps)
            stage = self.model.stage + 1
        return Comparison(base, trained, _rows(base_scores), _rows(trained_scores), name, stage)


def _rows(scores) -> list[dict[str, float]]:
    rows = [{"reward": float(r)} for r in scores.reward]
    for component, values in scores.components.items():
        for row, value in zip(rows, values.tolist()):
            row[component] = float(value)
    return rows


def _caption(row: dict[str, float]) -> str:
    return " · ".join(f"{k} {v:.3f}" for k, v in row.items())


def build_app(studio: Studio, title: str = "divrl"):
    """The Gradio page over ``studio``; its endpoint ``/generate`` answers Gradio's clients too."""
    import gradio as gr

    from divrl.images import to_pil

    names = list(studio.weights)

    def generate(references, masks, prompt, seed, num_samples, num_steps, weights_index):
        files = [getattr(f, "name", f) for f in (references or [])]
        mask_files = [getattr(f, "name", f) for f in (masks or [])]
        try:
            out = studio.compare(
                files,
                prompt,
                mask_files or None,
                int(seed),
                int(num_samples),
                int(num_steps),
                names[int(weights_index) - 1],
            )
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from None
        base = [(to_pil(image), _caption(row)) for image, row in zip(out.base, out.base_scores)]
        trained = [(to_pil(image), _caption(row)) for image, row in zip(out.trained, out.trained_scores)]
        columns = list(out.base_scores[0])
        table = [["base", k, *(row[c] for c in columns)] for k, row in enumerate(out.base_scores)] + [
            [out.weights, k, *(row[c] for c in columns)] for k, row in enumerate(out.trained_scores)
        ]
        summary = f"scored by the stage-{out.stage} reward of the run ({type(studio.model.reward).__name__})"
        return base, trained, gr.update(value=table, headers=["model", "sample", *columns]), summary

    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# {title}\nThe base model and the trained weights on the same references, prompt and seeds; each sample "
            f"is captioned with its reward components."
        )
        with gr.Row():
            with gr.Column(scale=1):
                references = gr.File(label="references (one per subject)", file_count="multiple", file_types=["image"])
                masks = gr.File(
                    label="subject masks (optional, one per reference)", file_count="multiple", file_types=["image"]
                )
                prompt = gr.Textbox(label="prompt", placeholder="a photo of the subject on the beach")
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0, minimum=0)
                    num_samples = gr.Slider(1, 8, value=4, step=1, label="samples")
                    num_steps = gr.Slider(1, 50, value=28, step=1, label="steps")
                weights = gr.Slider(
                    1,
                    max(len(names), 2),
                    value=len(names),
                    step=1,
                    label="trained weights: " + ", ".join(f"{i + 1} = {n}" for i, n in enumerate(names)),
                    visible=len(names) > 1,
                )
                button = gr.Button("generate", variant="primary")
            with gr.Column(scale=2):
                base = gr.Gallery(label="base model", columns=4, format="png", height="auto")
                trained = gr.Gallery(label="trained", columns=4, format="png", height="auto")
                table = gr.Dataframe(label="scores", interactive=False)
                summary = gr.Markdown()
        button.click(
            generate,
            [references, masks, prompt, seed, num_samples, num_steps, weights],
            [base, trained, table, summary],
            api_name="generate",
        )
    return app

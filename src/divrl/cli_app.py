"""``divrl app --lora RUN_OR_LORA``: a Gradio page comparing the base model's and the trained samples
(:mod:`divrl.app`; ``pip install 'divrl[app]'``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_app_command(commands, bounded) -> None:
    app = commands.add_parser(
        "app",
        help="look at a trained model in the browser: base and trained samples side by side, with their rewards",
        description=(
            "Serve a Gradio page (the `app` extra: pip install 'divrl[app]') that samples uploaded references with "
            "the base model and the trained LoRA, side by side, each sample captioned with its reward components."
        ),
    )
    app.add_argument("--lora", type=Path, required=True, help="a run folder (runs/demo) or a LoRA folder")
    app.add_argument("--config", type=Path, help="the run's config.yaml (default: found beside the weights)")
    app.add_argument("--base", help="the base model (Hub id or folder) in place of the config's model.policy.model")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    app.add_argument("--port", type=bounded(int, 0, high=65535), default=7860, help="port (default 7860)")
    app.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    app.set_defaults(func=run_app)


def studio_for(args: argparse.Namespace):
    """The :class:`~divrl.app.Studio` of ``divrl app``'s arguments: every export of the run (stages, then final)."""
    from divrl.app import Studio
    from divrl.export import ExportError, find_run

    run = find_run(args.lora, args.config)
    if run.config_path is None:
        raise ExportError(f"--lora {args.lora}: no config.yaml found beside the weights; pass --config (the run's)")
    weights = {**run.stages, "final" if run.lora.name == "final" else run.lora.name: run.lora}
    overrides = ["--model.policy.init_args.model", args.base] if args.base else []
    return Studio(run.config_path, weights, overrides)


def run_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("divrl app needs Gradio: pip install 'divrl[app]'") from None
    from divrl.app import build_app

    app = build_app(studio_for(args), title=f"divrl · {args.lora}")
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0

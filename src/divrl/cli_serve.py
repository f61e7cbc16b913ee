"""``divrl serve-reward``: the command line of :mod:`divrl.serve` (which needs LitServe; this module does not)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

__all__ = ["HOSTS", "add_serve_command", "run_serve_reward"]

log = logging.getLogger("divrl.serve")

HOSTS = ("127.0.0.1", "0.0.0.0", "::")
"""The addresses LitServe binds: this machine only (the default), or every interface (IPv4, IPv6)."""


def add_serve_command(commands, bounded) -> None:
    """The ``serve-reward`` subcommand of the ``divrl`` parser (``bounded``: cli.py's range-checked argparse type)."""
    serve = commands.add_parser(
        "serve-reward",
        help="serve a reward on LitServe for RemoteReward clients (training on other GPUs or nodes)",
        description=(
            "Serve one divrl reward on LitServe: POST /predict scores a group, GET /health answers 200 when the "
            "workers are ready. Point training at it with divrl.rewards.RemoteReward(urls=[...])."
        ),
    )
    serve.add_argument(
        "--config",
        type=Path,
        required=True,
        help="the reward: a YAML block (class_path, init_args) as an entry of model.rewards, or a "
        "training config (then --stage picks its reward)",
    )
    serve.add_argument("--stage", type=bounded(int, 1), help="with a training config: which stage's reward (1-based)")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        choices=HOSTS,
        metavar="HOST",
        help="address to bind: 127.0.0.1 (default: this machine only), 0.0.0.0 or :: (every interface)",
    )
    serve.add_argument("--port", type=bounded(int, 1024, high=65535), default=8000, help="port (default 8000)")
    serve.add_argument(
        "--accelerator",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where the workers run the reward (default auto: the GPUs when there are some)",
    )
    serve.add_argument("--devices", default="auto", type=_devices, help="how many devices (default auto: all)")
    serve.add_argument(
        "--workers-per-device", type=bounded(int, 1), default=1, help="reward replicas per device (default 1)"
    )
    serve.add_argument(
        "--max-batch-size",
        type=bounded(int, 1),
        default=1,
        help="groups a worker takes at once, from any clients (default 1)",
    )
    serve.add_argument(
        "--batch-timeout",
        type=bounded(float, 0),
        default=0.01,
        help="seconds a worker waits to fill a batch (default 0.01)",
    )
    serve.add_argument(
        "--api-key",
        help="require this X-API-Key on every request (default: $DIVRL_REWARD_API_KEY when "
        "set); prefer the variable: a command line is visible in ps",
    )
    serve.add_argument(
        "--max-request-mb",
        type=bounded(float, 0, strict=True),
        default=160.0,
        help="largest request body in MiB (default 160; a group of 21 float32 512x512 images is 88)",
    )
    serve.add_argument(
        "--timeout",
        type=bounded(float, 0, strict=True),
        default=90.0,
        help="seconds a request may wait for a worker before it gets 504 (default 90; keep it below "
        "the clients' timeout, 120 by default, so a busy server answers before they give up)",
    )
    serve.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the HTTP server's log level (default warning)",
    )
    serve.set_defaults(func=run_serve_reward)


def _devices(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number of devices >= 1, got {text}")
    return value


def run_serve_reward(args: argparse.Namespace) -> int:
    """Serve the reward of ``args.config`` until interrupted (Ctrl-C or SIGTERM)."""
    from divrl.rewards.config import build_reward, reward_block
    from divrl.rewards.remote import API_KEY_ENV

    block = reward_block(args.config, args.stage)
    reward = build_reward(block)  # a bad block is refused here, once, not in every worker
    try:
        from divrl.serve import reward_server
    except ImportError as err:
        raise ImportError(f"divrl serve-reward needs LitServe ({err}): pip install 'divrl[serve]'") from None
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host != "127.0.0.1" and api_key is None:
        log.warning(
            "divrl serve-reward: listening on every interface (--host %s) without an API key: anyone who can "
            "reach port %d can score on this machine; set $%s",
            args.host,
            args.port,
            API_KEY_ENV,
        )
    server = reward_server(
        block,
        api_key=api_key,
        accelerator=args.accelerator,
        devices=args.devices,
        workers_per_device=args.workers_per_device,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        max_request_mb=args.max_request_mb,
        timeout=args.timeout,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"divrl serve-reward: {type(reward).__name__} on http://{host}:{args.port}/predict "
        f"({args.workers_per_device} worker(s) per device, batches of up to {args.max_batch_size} group(s)"
        f"{', API key required on every endpoint' if api_key else ''}); GET /health answers 200 when it is ready",
        flush=True,
    )
    del reward
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level=args.log_level)
    return 0

"""``torchship serve``."""

from __future__ import annotations

import argparse
from typing import Any, TypeAlias

from torchship.errors import ConfigError
from torchship.settings import load_settings

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _workers(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _batch(value: str) -> int | str:
    return value if value == "auto" else int(value)


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP (FastAPI or Flask)",
        description="Serve stored models. Flags override TORCHSHIP_* env vars, which override "
        "the --config YAML file.",
    )
    p.add_argument("--config", help="YAML settings file (see configs/)")
    p.add_argument("--store", help="model store folder (default ./models)")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME[:VERSION]",
        help="model to serve; repeat for several (default: digits)",
    )
    p.add_argument("--framework", choices=["fastapi", "flask"])
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int)
    p.add_argument("--management-port", type=int, help="serve /manage/* only on this port")
    p.add_argument("--workers", type=_workers, help="worker processes, or 'auto'")
    p.add_argument("--threads", type=int, help="intra-op threads per worker")
    p.add_argument("--runtime", choices=["auto", "eager", "torchscript", "onnx"])
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch-size", type=_batch, help="an integer, or 'auto'")
    p.add_argument("--max-delay-ms", type=float)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--timeout-s", type=float)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument(
        "--handler",
        action="append",
        dest="handler_specs",
        metavar="NAME=MODULE:CLASS",
        help="custom handler for a model, e.g. digits=my_handlers.py:Inverted",
    )
    p.add_argument("--trust-pickle", action="store_true", default=None)
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from torchship.serving.runner import serve
    from torchship.serving.settings import ServeSettings

    fields: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "store",
            "models",
            "framework",
            "host",
            "port",
            "management_port",
            "workers",
            "threads",
            "runtime",
            "device",
            "max_batch_size",
            "max_delay_ms",
            "max_queue_size",
            "timeout_s",
            "max_body_bytes",
            "trust_pickle",
        )
    }
    if args.handler_specs:
        fields["handlers"] = dict(_split_handler(h) for h in args.handler_specs)
    settings = load_settings(args.config, cls=ServeSettings, **fields)
    serve(settings)
    return 0


def _split_handler(value: str) -> tuple[str, str]:
    name, sep, spec = value.partition("=")
    if not sep or not name or not spec:
        raise ConfigError(f"--handler {value!r} must look like NAME=MODULE:CLASS.")
    return name, spec

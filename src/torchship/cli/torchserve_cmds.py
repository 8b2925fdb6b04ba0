"""``torchship torchserve start|stop|status``: a real TorchServe, several models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TypeAlias

from rich.table import Table

from torchship.cli.models_cmds import console
from torchship.errors import ConfigError

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "torchserve",
        help="run a real TorchServe (Java) with several .mar models: start, stop, status",
        description="Writes config.properties (127.0.0.1 only, token auth and model API "
        "stated), starts TorchServe in the background and waits until every model has a "
        "READY worker. Needs 'pip install torchship[torchserve]' and Java 17.",
    )
    tsub = p.add_subparsers(dest="torchserve_command", required=True, metavar="ACTION")
    s = tsub.add_parser("start", help="start TorchServe and wait until its models are ready")
    _home(s)
    s.add_argument("--model-store", required=True, help="folder holding the .mar files")
    s.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="NAME=FILE.mar",
        help="archives to load: NAME=FILE.mar or FILE.mar (name from its manifest)",
    )
    s.add_argument("--inference-port", type=int, help="default: a free port")
    s.add_argument("--management-port", type=int, help="default: a free port")
    s.add_argument("--metrics-port", type=int, help="default: a free port")
    s.add_argument(
        "--no-token-auth",
        action="store_true",
        help="disable_token_authorization=true (default: tokens on, in key_file.json)",
    )
    s.add_argument(
        "--enable-model-api",
        action="store_true",
        help="allow register/unregister through the management API (default: off)",
    )
    s.add_argument("--workers", type=int, default=1, help="workers per model (default 1)")
    s.add_argument("--java-heap", default="1g", help="JVM -Xmx (default 1g)")
    s.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for ready")
    s.set_defaults(handler=cmd_start)
    s = tsub.add_parser("stop", help="stop it (SIGTERM, then SIGKILL after --timeout)")
    _home(s)
    s.add_argument("--timeout", type=float, default=30.0)
    s.set_defaults(handler=cmd_stop)
    s = tsub.add_parser("status", help="addresses, /ping and every model's workers")
    _home(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=cmd_status)


def _home(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        default=".torchship/torchserve",
        help="instance folder: config, keys, logs, temp files (default .torchship/torchserve)",
    )


def _models(specs: list[str], store: Path) -> dict[str, str]:
    from torchship.archive import inspect_archive
    from torchship.store import validate_name

    models: dict[str, str] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            file = spec
            name = inspect_archive(store / file).manifest.model.model_name
        if not file.endswith(".mar") or "/" in file:
            raise ConfigError(f"{spec!r}: name a .mar file in the model store.")
        if not (store / file).is_file():
            raise ConfigError(f"{store / file} does not exist.")
        models[validate_name(name)] = file
    return models


def cmd_start(args: argparse.Namespace) -> int:
    from torchship.torchserve.config import TorchServeConfig, free_port
    from torchship.torchserve.process import TorchServe

    store = Path(args.model_store)
    cfg = TorchServeConfig(
        home=Path(args.home),
        model_store=store,
        models=_models(args.models, store),
        inference_port=args.inference_port or free_port(),
        management_port=args.management_port or free_port(),
        metrics_port=args.metrics_port or free_port(),
        token_auth=not args.no_token_auth,
        model_api=args.enable_model_api,
        workers_per_model=args.workers,
        java_heap=args.java_heap,
    )
    console.print(f"Starting TorchServe with {', '.join(cfg.models)} ...")
    ts = TorchServe(cfg).start(args.timeout)
    console.print(
        f"TorchServe ready (pid {ts.pid}): inference {cfg.inference_url}, management "
        f"{cfg.management_url}, metrics {cfg.metrics_url}"
    )
    if cfg.token_auth:
        console.print(f"Token authorization is on: keys in {cfg.home / 'key_file.json'}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from torchship.torchserve.process import TorchServe

    ts = TorchServe.from_home(args.home)
    graceful = ts.stop(args.timeout)
    console.print("TorchServe stopped." if graceful else "TorchServe was killed (SIGKILL).")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from torchship.torchserve.process import TorchServe

    info = TorchServe.from_home(args.home).status()
    if args.json:
        console.print(json.dumps(info, indent=2))
        return 0 if info["running"] else 1
    if not info["running"]:
        console.print(f"TorchServe from {info['home']} is not running.")
        return 1
    console.print(
        f"TorchServe pid {info['pid']}: /ping {info['ping']}; inference {info['inference']}, "
        f"management {info['management']}"
    )
    table = Table(title="Models")
    for col in ("model", "version", "archive", "batch", "workers", "ready"):
        table.add_column(col)
    for m in info["models"]:
        ready = sum(w.get("status") == "READY" for w in m.get("workers", []))
        table.add_row(
            m["modelName"],
            m["modelVersion"],
            m["modelUrl"],
            str(m["batchSize"]),
            str(len(m.get("workers", []))),
            str(ready),
        )
    console.print(table)
    return 0

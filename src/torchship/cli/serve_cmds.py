"""``torchship serve``."""

from __future__ import annotations

import argparse
from typing import Any, TypeAlias

from torchship.cli._args import int_or_auto
from torchship.errors import ConfigError
from torchship.settings import load_settings

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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
    p.add_argument(
        "--model-store", help="folder of TorchServe .mar archives (as torchserve --model-store)"
    )
    p.add_argument(
        "--models",
        nargs="+",
        dest="archive_specs",
        metavar="NAME=FILE.mar",
        help="TorchServe archives to serve, as torchserve --models takes them: NAME=FILE.mar, "
        "FILE.mar, FILE.tar.gz (tgz format), NAME=FOLDER (no-archive format) or 'all' (every "
        "archive in the model store); together with --model if given",
    )
    p.add_argument(
        "--allow-url-registration",
        action="store_true",
        default=None,
        help="let TorchServe's POST /models?url=http(s)://... download archives",
    )
    p.add_argument("--framework", choices=["fastapi", "flask"])
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int)
    p.add_argument("--management-port", type=int, help="serve /manage/* only on this port")
    p.add_argument("--workers", type=int_or_auto, help="worker processes, or 'auto'")
    p.add_argument("--threads", type=int, help="intra-op threads per worker")
    p.add_argument("--runtime", choices=["auto", "eager", "torchscript", "onnx"])
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch-size", type=int_or_auto, help="an integer, or 'auto'")
    p.add_argument("--max-delay-ms", type=float)
    p.add_argument(
        "--max-batch-ms",
        type=float,
        help="with --max-batch-size auto: never choose a batch whose compute takes longer "
        "than this (default 250)",
    )
    p.add_argument(
        "--inline-batch-ms",
        type=float,
        help="FastAPI: run batches on the event loop for CPU models measured faster than "
        "this (default 1.0; 0: always a worker thread)",
    )
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
    p.add_argument(
        "--engine",
        choices=["torchship", "ray"],
        default="torchship",
        help="torchship's own server (default), or Ray Serve replicas with Ray's batching",
    )
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (--engine ray)")
    p.add_argument(
        "--retune",
        action="store_true",
        default=None,
        help="measure runtime and batch size again instead of reusing <store>/.tuning",
    )
    _add_protection_flags(p)
    _add_log_flags(p)
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
            "max_batch_ms",
            "inline_batch_ms",
            "max_queue_size",
            "timeout_s",
            "max_body_bytes",
            "trust_pickle",
            "retune",
            "model_store",
            "allow_url_registration",
        )
    }
    if args.archive_specs:
        fields["models"] = [*(args.models or []), *_archive_specs(args)]
    if args.handler_specs:
        fields["handlers"] = dict(_split_handler(h) for h in args.handler_specs)
    fields.update(_protection_fields(args))
    fields.update(_log_fields(args))
    settings = load_settings(args.config, cls=ServeSettings, **fields)
    if args.engine == "ray":
        from torchship.serving.preflight import preflight
        from torchship.serving.ray_serve import serve_ray

        preflight(settings)
        serve_ray(settings, replicas=args.replicas)
        return 0
    serve(settings)
    return 0


def _archive_specs(args: argparse.Namespace) -> list[str]:
    """``--models`` as TorchServe reads it; ``all`` is every archive in the model store."""
    from pathlib import Path

    from torchship.archive.sources import find_archives, is_archive_name

    specs: list[str] = []
    for spec in args.archive_specs:
        if spec.lower() == "all":
            if not args.model_store:
                raise ConfigError("--models all needs --model-store.")
            specs += find_archives(Path(args.model_store))
        elif "=" in spec or is_archive_name(spec):
            specs.append(spec)
        else:
            raise ConfigError(
                f"--models {spec!r} must be NAME=FILE.mar, FILE.mar (or .tar.gz), "
                "NAME=FOLDER (no-archive) or all.",
                hint="Store models are served with --model NAME[:VERSION].",
            )
    return specs


def _split_handler(value: str) -> tuple[str, str]:
    name, sep, spec = value.partition("=")
    if not sep or not name or not spec:
        raise ConfigError(f"--handler {value!r} must look like NAME=MODULE:CLASS.")
    return name, spec


def _add_protection_flags(p: argparse.ArgumentParser) -> None:
    """Auth, rate limits, cache, CORS, drain (``torchship.serving.policies``)."""
    g = p.add_argument_group(
        "production protections",
        "API keys come from TORCHSHIP_API_KEYS or --api-keys-file, never from a flag "
        "(other users could read them in the process list).",
    )
    g.add_argument(
        "--api-keys-file", help="YAML/JSON {keys: [{name, scopes, sha256}]}; turns auth on"
    )
    g.add_argument(
        "--open-path",
        action="append",
        dest="open_paths",
        metavar="PATH",
        help="a path needing no key (repeat; '/x/' is a prefix); replaces the default "
        "health, ping and metrics",
    )
    g.add_argument(
        "--rate-limit",
        action="append",
        dest="rate_limit_specs",
        metavar="[SCOPE=]RATE[:BURST]",
        help="token bucket in requests/s per key or client IP, e.g. 10:20 or admin=1:5 "
        "(scopes: inference, the default, and admin)",
    )
    g.add_argument("--rate-limit-backend", choices=["memory", "redis"])
    g.add_argument(
        "--trusted-proxy",
        action="append",
        dest="trusted_proxies",
        metavar="IP|CIDR",
        help="believe X-Forwarded-For from this proxy (repeat)",
    )
    g.add_argument(
        "--cache",
        action="store_true",
        default=None,
        help="cache answers per model version and input (a request's 'Cache-Control: "
        "no-cache' skips the lookup, 'no-store' skips the cache)",
    )
    g.add_argument("--cache-backend", choices=["memory", "redis"])
    g.add_argument("--cache-ttl-s", type=float)
    g.add_argument("--cache-max-entries", type=int)
    g.add_argument("--redis-url", help="redis://host:port/db for the redis backends")
    g.add_argument(
        "--cors-origin",
        action="append",
        dest="cors_origins",
        metavar="ORIGIN",
        help="a browser origin allowed to call the API, e.g. https://app.example (repeat)",
    )
    g.add_argument(
        "--drain-delay-s",
        type=float,
        help="after SIGTERM, stay up not-ready this long before draining",
    )


def _protection_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "api_keys_file",
            "open_paths",
            "rate_limit_backend",
            "trusted_proxies",
            "cache",
            "cache_backend",
            "cache_ttl_s",
            "cache_max_entries",
            "redis_url",
            "cors_origins",
            "drain_delay_s",
        )
    }
    if args.rate_limit_specs:
        limits: dict[str, str] = {}
        for spec in args.rate_limit_specs:
            scope, sep, limit = spec.rpartition("=")
            limits[scope if sep else "inference"] = limit
        fields["rate_limits"] = limits
    return fields


def _add_log_flags(p: argparse.ArgumentParser) -> None:
    """Structured logs (``torchship.monitoring.logs``)."""
    g = p.add_argument_group("logging")
    g.add_argument("--log-format", choices=["text", "json"], help="log lines (default text)")
    g.add_argument(
        "--no-access-log",
        action="store_false",
        dest="access_log",
        default=None,
        help="no per-request lines",
    )
    g.add_argument(
        "--log-sample-rate",
        type=float,
        metavar="FRACTION",
        help="fraction of successful requests logged (errors always are)",
    )
    g.add_argument(
        "--log-bodies",
        action="store_true",
        default=None,
        help="add headers and request/response bodies (truncated, redacted) to access lines",
    )
    g.add_argument("--log-max-body-chars", type=int, metavar="N")
    g.add_argument(
        "--log-redact-field",
        action="append",
        dest="log_redact_fields",
        metavar="NAME",
        help="JSON key, header or query name logged as [REDACTED] (repeat; replaces the "
        "default list)",
    )


def _log_fields(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "log_format",
        "access_log",
        "log_sample_rate",
        "log_bodies",
        "log_max_body_chars",
        "log_redact_fields",
    )
    return {k: getattr(args, k) for k in keys}

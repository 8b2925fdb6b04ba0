"""``torchship archive``: build (or inspect) a TorchServe model archive."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from torchship.cli._args import SubParsers
from torchship.cli.models_cmds import console
from torchship.errors import ConfigError
from torchship.settings import load_settings


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "archive",
        help="build a TorchServe model archive (.mar) from a stored model",
        description="Package a store version as a .mar that TorchServe and torchship both "
        "serve: TorchScript (or eager weights + model file), handler, labels, input spec "
        "and model-config.yaml. --inspect checks an existing archive instead.",
    )
    p.add_argument("--store", help="model store folder (env TORCHSHIP_STORE; default ./models)")
    p.add_argument("--model", metavar="NAME[:VERSION]", help="the store version to package")
    p.add_argument(
        "--handler",
        dest="handler_spec",  # args.handler is the command's function
        default="image",
        metavar="image|tensor|PATH.py",
        help="image, tensor, a TorchServe built-in (image_classifier, ...) or PATH.py",
    )
    p.add_argument("--export-path", default="model_store", help="folder to write NAME.mar to")
    p.add_argument("--model-name", help="name inside the archive (default: the store name)")
    p.add_argument("--version", help="modelVersion (default: the store version)")
    p.add_argument("--runtime", choices=["auto", "torchscript", "eager"], default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize")
    p.add_argument("--max-batch-delay", type=int, default=5, help="maxBatchDelay in ms")
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, help="default: --min-workers")
    p.add_argument("--response-timeout", type=int, default=120, help="seconds")
    p.add_argument("--extra-files", nargs="*", default=[], metavar="FILE")
    p.add_argument("--requirements-file")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing archive")
    p.add_argument("--inspect", metavar="FILE.mar", help="check an archive and show it")
    p.set_defaults(handler=cmd_archive)


def cmd_archive(args: argparse.Namespace) -> int:
    from torchship.archive import ModelConfig, build_archive, inspect_archive

    if args.inspect:
        info = inspect_archive(args.inspect)
        console.print(info.manifest.to_json())
        title = f"{Path(args.inspect).name} ({info.format}, sha256 {info.sha256[:16]}...)"
        table = Table(title=title)
        for col in ("entry", "bytes", "packed"):
            table.add_column(col)
        for e in info.entries:
            packed = "-" if e.compressed_size is None else str(e.compressed_size)
            table.add_row(e.name, str(e.size), packed)
        console.print(table)
        return 0
    if not args.model:
        raise ConfigError("Say which model to archive: --model NAME[:VERSION].")
    store: Path = load_settings(store=args.store).store
    built = build_archive(
        store,
        args.model,
        handler=args.handler_spec,
        export_path=args.export_path,
        runtime=args.runtime,
        model_name=args.model_name,
        version=args.version,
        config=ModelConfig(
            batch_size=args.batch_size,
            max_batch_delay_ms=args.max_batch_delay,
            min_workers=args.min_workers,
            max_workers=args.max_workers or args.min_workers,
            response_timeout_s=args.response_timeout,
        ),
        extra_files=args.extra_files,
        requirements_file=args.requirements_file,
        overwrite=args.force,
    )
    m = built.manifest.model
    console.print(
        f"Wrote [bold]{built.path}[/] ({built.size / 1024:.1f} KiB): {m.model_name} "
        f"version {m.version}, {built.runtime}, handler {m.handler}"
    )
    console.print(json.dumps(sorted(built.files)))
    return 0

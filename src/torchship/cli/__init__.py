"""The ``torchship`` command line: argparse front end over the toolkit's functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console

from torchship import __version__
from torchship.cli import models_cmds
from torchship.errors import TorchshipError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchship",
        description="Take a trained PyTorch model to production: store, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"torchship {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models_cmds.register(sub)
    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands from later modules register themselves here when present."""
    import importlib

    for module in (
        "torchship.cli.serve_cmds",
        "torchship.cli.batch_cmds",
        "torchship.cli.deploy_cmds",
        "torchship.cli.archive_cmds",
        "torchship.cli.torchserve_cmds",
        "torchship.cli.optimize_cmds",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    err = Console(stderr=True)
    try:
        return int(args.handler(args) or 0)
    except TorchshipError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

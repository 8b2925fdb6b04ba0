"""The ``torchship`` command line: argparse front end over the toolkit's functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from torchship import __version__
from torchship._startup import pause_gc
from torchship.errors import TorchshipError

#: Commands whose module is imported alone when they are run: a server's start-up
#: should not pay for importing every other command (rich, the optimizers, ...).
LIGHT_COMMANDS = {"serve": "torchship.cli.serve_cmds"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or with ``command`` in :data:`LIGHT_COMMANDS` only that one."""
    parser = argparse.ArgumentParser(
        prog="torchship",
        description="Take a trained PyTorch model to production: store, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"torchship {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in LIGHT_COMMANDS:
        import importlib

        importlib.import_module(LIGHT_COMMANDS[command]).register(sub)
        return parser
    from torchship.cli import models_cmds

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
        "torchship.cli.keys_cmds",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first == "serve":
        pause_gc()  # on again once the models are loaded (InferenceService.start)
    parser = build_parser(first)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except TorchshipError as exc:
        from rich.console import Console

        err = Console(stderr=True)
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.hint:
            err.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

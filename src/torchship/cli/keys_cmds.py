"""``torchship keys new``: an API key for a client, its digest added to a keys file.

The secret is printed once and never stored: the file holds its SHA-256, which is all the
server needs (``--api-keys-file``), and a running server re-reads the file when it changes,
so keys rotate without a restart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from torchship.cli._args import SubParsers
from torchship.errors import ConfigError
from torchship.serving.policies.auth import (
    file_entry,
    load_file,
    make_key,
    new_key,
    parse_scopes,
)


def register(sub: SubParsers) -> None:
    keys = sub.add_parser("keys", help="make API keys for a server's --api-keys-file")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ksub.add_parser(
        "new",
        help="a new key: prints the secret once, adds its digest to the keys file",
    )
    p.add_argument("--name", required=True, help="who holds it (1-64 letters, digits, . _ -)")
    p.add_argument(
        "--scopes",
        default="inference",
        help="inference, admin, or inference+admin (default inference)",
    )
    p.add_argument("--file", type=Path, required=True, help="the YAML keys file (made if missing)")
    p.set_defaults(handler=cmd_keys_new)


def cmd_keys_new(args: argparse.Namespace) -> int:
    path: Path = args.file
    existing = load_file(path) if path.exists() else []
    if any(k.name == args.name for k in existing):
        raise ConfigError(
            f"{path} already has a key named {args.name!r}.",
            hint="Pick another name, or remove that entry from the file first.",
        )
    secret = new_key()
    key = make_key(args.name, parse_scopes(args.scopes), secret)
    data: dict[str, Any] = {"keys": []}
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        data = loaded if isinstance(loaded, dict) else {"keys": loaded}
        data.setdefault("keys", [])
    data["keys"].append(file_entry(key))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)  # atomic: a server re-reading the file never sees half of it
    print(secret)
    print(
        f"# added {key.name!r} ({'+'.join(sorted(key.scopes))}) to {path}; the secret above is "
        "shown once: hand it to the client (X-API-Key or Authorization: Bearer)",
        file=sys.stderr,
    )
    return 0

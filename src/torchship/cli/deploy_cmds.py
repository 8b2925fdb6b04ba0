"""``torchship package`` and ``torchship image base|build``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from torchship.cli._args import SubParsers, int_or_auto
from torchship.errors import ConfigError
from torchship.settings import load_settings
from torchship.store import ModelStore

console = Console(highlight=False)


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "package",
        help="write a ready-to-build container context for one model",
        description="Copy one model version (checksums verified), pinned requirements, "
        "torchship's source, the project's Dockerfile and a server config into DIR.",
    )
    p.add_argument("--store", help="model store folder (env TORCHSHIP_STORE; default ./models)")
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]", help="what to package")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the context folder")
    p.add_argument("--framework", choices=["fastapi", "flask"])
    p.add_argument("--workers", type=int_or_auto, help="worker processes in the container, or auto")
    p.add_argument("--runtime", choices=["auto", "eager", "torchscript", "onnx"])
    p.add_argument("--force", action="store_true", help="replace an earlier package in DIR")
    p.set_defaults(handler=cmd_package)

    image = sub.add_parser("image", help="build the server image with buildah (no Docker needed)")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    p = isub.add_parser(
        "base",
        help="make the Dockerfile's base image from Debian packages (no registry needed)",
    )
    p.add_argument("--name", help="image name (default docker.io/library/python:3.11-slim)")
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    p.set_defaults(handler=cmd_image_base)
    p = isub.add_parser("build", help="buildah bud a context (repo root or a package folder)")
    p.add_argument("context", type=Path, help="build context folder")
    p.add_argument(
        "--tag", help="image tag (default for a package folder: torchship-MODEL:VERSION)"
    )
    p.add_argument("--file", type=Path, help="Dockerfile (default CONTEXT/Dockerfile)")
    p.add_argument("--variant", default="cpu", help="TORCH_INDEX: cpu (default), cu128, ...")
    p.add_argument(
        "--offline",
        action="store_true",
        help="download the pinned wheels here first; the build then uses no index",
    )
    p.set_defaults(handler=cmd_image_build)


def cmd_package(args: argparse.Namespace) -> int:
    from torchship.deploy import write_package

    store = ModelStore(load_settings(store=args.store).store)
    info = write_package(
        store,
        args.model,
        args.out,
        force=args.force,
        framework=args.framework,
        workers=args.workers,
        runtime=args.runtime,
    )
    console.print(
        f"packaged {info.ref} into {info.path} ({len(info.requirements)} pinned requirements)"
    )
    for path, digest in info.files.items():
        console.print(f"  {path}  sha256 {digest[:16]}…")
    console.print(f"build: torchship image build {info.path}  (buildah, no Docker engine)")
    console.print(f"   or: docker build -t {info.default_tag()} {info.path}")
    return 0


def cmd_image_base(args: argparse.Namespace) -> int:
    from torchship.deploy.base_image import BASE_IMAGE, ensure_base_image

    name = args.name or BASE_IMAGE
    built = ensure_base_image(name, force=args.force)
    console.print(f"{name}: {'built from Debian packages' if built else 'already present'}")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from torchship.deploy.base_image import BASE_IMAGE, ensure_base_image
    from torchship.deploy.image import build_image, default_wheelhouse, make_wheelhouse
    from torchship.deploy.package import package_tag

    tag = args.tag or package_tag(args.context)
    if tag is None:
        raise ConfigError(
            f"{args.context} is not a folder `torchship package` wrote: name the image.",
            hint="Add --tag NAME:TAG.",
        )
    ensure_base_image(BASE_IMAGE)
    dockerfile = args.file or args.context / "Dockerfile"
    wheelhouse = None
    if args.offline:
        wheelhouse = make_wheelhouse(args.context / "requirements.txt", default_wheelhouse())
    result = build_image(
        args.context, tag, dockerfile=dockerfile, variant=args.variant, wheelhouse=wheelhouse
    )
    console.print(
        f"built {result.tag} ({result.image_id[:12]}, {result.size_bytes / 1e6:.0f} MB) "
        f"in {result.seconds:.1f} s"
    )
    return 0

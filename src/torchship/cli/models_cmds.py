"""``train-demo``, ``models ...``, ``export`` and ``predict``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TypeAlias

from rich.console import Console
from rich.table import Table

from torchship.cli._args import non_negative, top_k_count
from torchship.errors import InvalidInputError, TorchshipError
from torchship.settings import Settings, load_settings
from torchship.store import ModelStore, parse_ref

# Piped output (tests, logs) gets room for the tables instead of 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _store(args: argparse.Namespace) -> ModelStore:
    return ModelStore(load_settings(store=args.store).store)


def _add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="model store folder (env TORCHSHIP_STORE; default ./models)")


def register(sub: SubParsers) -> None:
    p = sub.add_parser("train-demo", help="train the default digits model and store it")
    _add_store_arg(p)
    p.add_argument("--name", default="digits", help="model name in the store (default digits)")
    p.add_argument("--arch", choices=["cnn", "mlp"], default="cnn", help="the zoo model to train")
    p.add_argument("--epochs", type=int, help="training epochs (default: the model's own)")
    p.add_argument("--alias", default="production", help="alias to point at the new version")
    p.add_argument("--no-export", action="store_true", help="skip TorchScript/ONNX export")
    p.add_argument("--if-missing", action="store_true", help="do nothing if the model exists")
    p.set_defaults(handler=cmd_train_demo)

    models = sub.add_parser("models", help="list, show, tag, verify and delete stored models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = msub.add_parser("list", help="every model and version")
    _add_store_arg(p)
    p.add_argument("name", nargs="?", help="only this model")
    p.set_defaults(handler=cmd_models_list)
    p = msub.add_parser("show", help="one version's manifest")
    _add_store_arg(p)
    p.add_argument("ref", help="NAME[:VERSION|ALIAS]")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.set_defaults(handler=cmd_models_show)
    p = msub.add_parser("tag", help="point an alias (e.g. production) at a version")
    _add_store_arg(p)
    p.add_argument("ref", help="NAME:VERSION")
    p.add_argument("alias")
    p.set_defaults(handler=cmd_models_tag)
    p = msub.add_parser("untag", help="remove an alias")
    _add_store_arg(p)
    p.add_argument("name", help="the model's name (no version)")
    p.add_argument("alias")
    p.set_defaults(handler=cmd_models_untag)
    p = msub.add_parser("verify", help="check every file against its recorded sha256")
    _add_store_arg(p)
    p.add_argument("ref")
    p.set_defaults(handler=cmd_models_verify)
    p = msub.add_parser("delete", help="delete one version")
    _add_store_arg(p)
    p.add_argument("ref", help="NAME:VERSION")
    p.add_argument("--force", action="store_true", help="even if an alias points at it")
    p.set_defaults(handler=cmd_models_delete)

    p = msub.add_parser("promote", help="move a version to a stage (production moves the default)")
    _add_store_arg(p)
    p.add_argument("ref", help="NAME:VERSION")
    p.add_argument("--stage", choices=["staging", "production", "archived"], default="production")
    p.add_argument("--reason", default="", help="recorded in the model's history")
    p.set_defaults(handler=cmd_models_promote)
    p = msub.add_parser("rollback", help="point production back at the previous version")
    _add_store_arg(p)
    p.add_argument("name")
    p.add_argument("--to", help="a version (default: the one production had before)")
    p.add_argument("--reason", default="", help="recorded in the model's history")
    p.set_defaults(handler=cmd_models_rollback)
    p = msub.add_parser("history", help="every promotion and rollback: when, what, why")
    _add_store_arg(p)
    p.add_argument("name")
    p.set_defaults(handler=cmd_models_history)

    p = sub.add_parser("export", help="export to TorchScript or ONNX, verified against eager")
    _add_store_arg(p)
    p.add_argument("ref", help="NAME[:VERSION|ALIAS]")
    p.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    p.add_argument("--method", choices=["trace", "script"], default="trace", help="TorchScript")
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo", help="ONNX")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tolerance", type=non_negative, default=1e-4)
    p.add_argument("--trust-pickle", action="store_true")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("predict", help="classify image or .npy files with a stored model")
    _add_store_arg(p)
    p.add_argument("--model", required=True, help="NAME[:VERSION|ALIAS]")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--runtime", choices=["auto", "eager", "torchscript", "onnx"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--top-k", type=top_k_count, default=3)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--trust-pickle", action="store_true")
    p.set_defaults(handler=cmd_predict)


def cmd_train_demo(args: argparse.Namespace) -> int:
    from torchship.demo import train_demo

    store = _store(args)
    if args.if_missing and store.versions(args.name):
        console.print(f"{args.name} already in {store.root}: {store.latest(args.name).ref}")
        return 0
    console.print(f"Training the digits {args.arch.upper()} on scikit-learn's digits ...")
    manifest = train_demo(
        store,
        args.name,
        arch=args.arch,
        epochs=args.epochs,
        export=not args.no_export,
        alias=args.alias or None,
    )
    acc = manifest.metrics["test_accuracy"]
    console.print(
        f"Saved [bold]{manifest.ref}[/] to {store.root} — test accuracy {acc:.2%}, "
        f"artifacts: {', '.join(manifest.artifacts)}"
    )
    return 0


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    table = Table(title=f"Models in {store.root}")
    for col in ("model", "version", "stage", "created", "aliases", "artifacts", "size", "test acc"):
        table.add_column(col)
    names = [args.name] if args.name else store.names()
    for name in names:
        from torchship.store.stages import stages

        aliases = store.aliases(name)
        staged = stages(store, name)
        for m in store.manifests(name):
            tags = [a for a, v in aliases.items() if v == m.version]
            acc = m.metrics.get("test_accuracy")
            table.add_row(
                name,
                m.version,
                staged.get(m.version, ""),
                m.created_at[:19].replace("T", " "),
                ", ".join(tags),
                ", ".join(f"{k}:{a.format}" for k, a in m.artifacts.items()),
                _fmt_size(sum(f.size for f in m.files.values())),
                f"{acc:.2%}" if acc is not None else "",
            )
    console.print(table)
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    store = _store(args)
    m = store.manifest(args.ref)
    if args.json:
        print(json.dumps(m.model_dump(mode="json"), indent=2))
        return 0
    console.print(f"[bold]{m.ref}[/]  {m.description}")
    info = Table.grid(padding=(0, 2))
    rows: list[tuple[str, Any]] = [
        ("created", m.created_at),
        ("torch / python", f"{m.torch_version} / {m.python_version}"),
        ("architecture", m.architecture.target if m.architecture else "-"),
        ("input", m.input.model_dump() if m.input else "-"),
        ("labels", ", ".join(m.labels) if m.labels else "-"),
        ("metrics", ", ".join(f"{k}={v:.4g}" for k, v in m.metrics.items()) or "-"),
        ("parent", m.parent or "-"),
        ("aliases", ", ".join(a for a, v in store.aliases(m.name).items() if v == m.version)),
    ]
    for key, value in rows:
        info.add_row(f"[dim]{key}[/]", str(value))
    console.print(info)
    table = Table(title="artifacts")
    for col in ("key", "format", "file", "method", "max |diff|", "tolerance", "latency"):
        table.add_column(col)
    for key, a in m.artifacts.items():
        v = a.verification
        table.add_row(
            key,
            a.format,
            a.file,
            a.method or "",
            f"{v.max_abs_diff:.2e}" if v else "",
            f"{v.tolerance:.0e}" if v else "",
            f"{v.latency_ms:.3f} ms (eager {v.reference_latency_ms:.3f})" if v else "",
        )
    console.print(table)
    files = Table(title="files")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for name, f in m.files.items():
        files.add_row(name, _fmt_size(f.size), f.sha256[:16] + "…")
    console.print(files)
    return 0


def cmd_models_tag(args: argparse.Namespace) -> int:
    name, version = parse_ref(args.ref)
    if version is None:
        raise InvalidInputError("Say which version to tag, e.g. digits:3.")
    store = _store(args)
    store.set_alias(name, args.alias, version)
    console.print(f"{name}:{args.alias} -> {store.resolve(name, args.alias)}")
    return 0


def cmd_models_untag(args: argparse.Namespace) -> int:
    if ":" in args.name:  # `tag` takes NAME:VERSION, so this slip is natural
        name = args.name.split(":", 1)[0]
        raise InvalidInputError(
            f"untag takes the model's name, not {args.name!r}: an alias names one version already.",
            hint=f"torchship models untag {name} {args.alias}",
        )
    _store(args).remove_alias(args.name, args.alias)
    console.print(f"removed alias {args.name}:{args.alias}")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    m = _store(args).verify(args.ref)
    console.print(f"{m.ref}: {len(m.files)} files match their sha256")
    return 0


def cmd_models_delete(args: argparse.Namespace) -> int:
    store = _store(args)
    ref = store.manifest(args.ref).ref
    store.delete(args.ref, force=args.force)
    console.print(f"deleted {ref}")
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    from torchship.store import stages

    name, version = parse_ref(args.ref)
    if version is None:
        raise InvalidInputError("Say which version to promote, e.g. digits:3.")
    record = stages.promote(_store(args), name, version, stage=args.stage, reason=args.reason)
    previous = record["previous_production"]
    console.print(
        f"{name}:{record['version']} -> {args.stage}"
        + (
            f" (was {previous}, now archived)"
            if args.stage == "production" and previous and previous != record["version"]
            else ""
        )
    )
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from torchship.store import stages

    record = stages.rollback(_store(args), args.name, to=args.to, reason=args.reason)
    console.print(f"{args.name}: production {record['from']} -> {record['to']}")
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    from torchship.store import stages

    table = Table(title=f"{args.name}: history")
    for col in ("when", "action", "details", "reason"):
        table.add_column(col)
    for r in stages.history(_store(args), args.name):
        details = {k: v for k, v in r.items() if k not in ("at", "action", "model", "reason")}
        table.add_row(
            str(r.get("at", ""))[:19],
            str(r.get("action")),
            ", ".join(f"{k}={v}" for k, v in details.items()),
            str(r.get("reason", "")),
        )
    console.print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from torchship.export import export_onnx, export_torchscript

    store = _store(args)
    if args.format == "torchscript":
        m = export_torchscript(
            store,
            args.ref,
            method=args.method,
            tolerance=args.tolerance,
            trust_pickle=args.trust_pickle,
        )
        key = "torchscript"
    else:
        m = export_onnx(
            store,
            args.ref,
            exporter=args.exporter,
            opset=args.opset,
            tolerance=args.tolerance,
            trust_pickle=args.trust_pickle,
        )
        key = "onnx"
    a = m.artifacts[key]
    v = a.verification
    assert v is not None
    console.print(
        f"{m.ref}: wrote {a.file} ({a.method}); verified at batch sizes {v.batch_sizes}: "
        f"max |diff| {v.max_abs_diff:.2e} <= {v.tolerance:.0e}; "
        f"latency {v.latency_ms:.3f} ms vs eager {v.reference_latency_ms:.3f} ms"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from torchship.postprocess import top_k
    from torchship.preprocessing import preprocess_image, validate_tensor
    from torchship.runtime import load_predictor

    settings: Settings = load_settings(store=args.store)
    predictor = load_predictor(
        settings.store,
        args.model,
        runtime=args.runtime,
        device=args.device,
        threads=settings.threads or os.cpu_count(),
        trust_pickle=args.trust_pickle,
    )
    spec = predictor.input_spec
    if spec is None:
        raise InvalidInputError(f"{predictor.manifest.ref} has no input spec to prepare files.")
    # one row per item (a .npy file may hold several), one per file that could not be read
    names: list[str] = []
    items: list[torch.Tensor] = []
    failed: list[tuple[str, str]] = []
    for path in args.files:
        try:
            if not path.is_file():
                raise InvalidInputError(f"{path} is not a file.")
            if path.suffix == ".npy":
                try:
                    arr = np.load(path, allow_pickle=False)
                except (ValueError, OSError, EOFError) as exc:
                    raise InvalidInputError(f"not a readable .npy file ({exc})") from exc
                found = validate_tensor(arr, spec)
                names += (
                    [str(path)] if len(found) == 1 else [f"{path}[{i}]" for i in range(len(found))]
                )
                items.extend(found)
            else:
                items.append(preprocess_image(path.read_bytes(), spec))
                names.append(str(path))
        except TorchshipError as exc:
            failed.append((str(path), exc.message))
    if not items:
        raise InvalidInputError(
            "No file could be read: " + "; ".join(f"{p}: {why}" for p, why in failed)
        )
    outputs = predictor.predict(torch.stack(items))
    results = top_k(outputs, predictor.labels, args.top_k)
    if args.json:
        for name, res in zip(names, results, strict=True):
            print(json.dumps({"file": name, "model": predictor.manifest.ref, "top_k": res}))
        for name, why in failed:
            print(json.dumps({"file": name, "model": predictor.manifest.ref, "error": why}))
        return 1 if failed else 0
    table = Table(title=f"{predictor.manifest.ref} via {predictor.runtime}")
    table.add_column("file")
    table.add_column("prediction")
    table.add_column("probability", justify="right")
    table.add_column(f"top {args.top_k}")
    for name, res in zip(names, results, strict=True):
        best = res[0]
        others = ", ".join(f"{r['label']} {r['probability']:.2f}" for r in res[1:])
        table.add_row(name, str(best["label"]), f"{best['probability']:.3f}", others)
    for name, why in failed:
        table.add_row(name, "[red]not read[/red]", "", why)
    console.print(table)
    return 1 if failed else 0

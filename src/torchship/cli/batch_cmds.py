"""``torchship batch``: offline inference over a folder or file of inputs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from torchship.cli._args import SubParsers, int_or_auto, top_k_count
from torchship.settings import load_settings

console = Console(highlight=False)


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "batch",
        help="predict every image/row of a folder or file, resumably",
        description="Run a stored model over a folder of images (recursive), a .csv/.jsonl/"
        ".parquet listing of paths or tensors, or an .npy/.npz array; write one row per "
        "input (in input order) to a .csv, .jsonl or .parquet file. Unreadable inputs get a "
        "row with status 'error' and the reason. Output is committed in chunks: after a "
        "crash or Ctrl-C, run the same command with --resume. Flags override TORCHSHIP_* "
        "env vars, which override the --config YAML file.",
    )
    p.add_argument("--model", required=True, metavar="NAME[:VERSION]", help="stored model")
    p.add_argument("--input", required=True, type=Path, metavar="DIR|FILE", dest="inputs")
    p.add_argument(
        "--output", required=True, type=Path, metavar="FILE", help=".csv .jsonl .parquet"
    )
    p.add_argument("--config", help="YAML settings file")
    p.add_argument("--store", help="model store folder (default ./models)")
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--num-workers", type=int_or_auto, help="loader processes (ray: actors), or auto"
    )
    p.add_argument("--threads", type=int, help="model intra-op threads (default: cores left)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--runtime", choices=["auto", "eager", "torchscript", "onnx"])
    p.add_argument("--top-k", type=top_k_count)
    p.add_argument("--engine", choices=["local", "ray"])
    p.add_argument("--ray-address", help="existing Ray cluster (default: start a local one)")
    p.add_argument("--amp", action="store_true", default=None, help="float16 autocast on CUDA")
    p.add_argument("--chunk-size", type=int, help="rows per committed chunk")
    p.add_argument("--commit-interval", type=float, dest="commit_interval_s", metavar="SECONDS")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--stop-after", type=int, metavar="N", help="process at most N items, then stop resumably"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: only on a terminal)",
    )
    p.add_argument("--trust-pickle", action="store_true", default=None)
    p.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="write throughput, totals and settings as a TensorBoard run under DIR",
    )
    p.set_defaults(handler=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from torchship.batch import BatchSettings, run

    fields: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "store",
            "batch_size",
            "num_workers",
            "threads",
            "device",
            "runtime",
            "top_k",
            "engine",
            "ray_address",
            "amp",
            "chunk_size",
            "commit_interval_s",
            "trust_pickle",
        )
    }
    s = load_settings(args.config, cls=BatchSettings, **fields)
    try:
        summary = run(
            args.model,
            args.inputs,
            args.output,
            store=s.store,
            batch_size=s.batch_size,
            num_workers=s.num_workers,
            threads=s.threads,
            device=s.device,
            runtime=s.runtime,
            top_k=s.top_k,
            resume=args.resume,
            overwrite=args.overwrite,
            engine=s.engine,
            ray_address=s.ray_address,
            amp=s.amp,
            chunk_size=s.chunk_size,
            commit_interval_s=s.commit_interval_s,
            stop_after=args.stop_after,
            progress=args.progress,
            max_image_pixels=s.max_image_pixels,
            trust_pickle=s.trust_pickle,
            tensorboard=args.tensorboard,
        )
    except KeyboardInterrupt:
        console.print(
            "interrupted: the rows computed so far are committed; "
            "run the same command with --resume to finish."
        )
        return 130
    console.print(str(summary))
    return 0

"""Offline batch inference: the naive loop vs ``torchship.batch`` vs the in-process ceiling.

For each model, on a folder of generated image files:

* naive: for each file, read it, preprocess it, call the model on a batch of one, write
  a CSV row; one thread of control, the model on all cores (what a first script does);
* torchship batch: ``torchship.batch.run`` (DataLoader, workers, batched model calls,
  chunked CSV output) at several batch sizes and worker counts (w), the model on the
  cores the workers leave (t), or on every core (oversubscribed, for comparison), and
  with ``num_workers="auto"``, which measures and chooses (what users get by default);
* ceiling: the same predictor on tensors preprocessed beforehand, at each batch size, on
  one thread and on all cores (no decoding, no output); the best is what batch
  inference could reach in this process.

Models: ResNet-18 (random weights, ImageNet preprocessing) on photo-like 500x375 JPEGs,
and the digits CNN (random weights) on 64x64 PNG drawings. Contenders run in rounds,
in rotating order, so background load lands on all alike; each cell is the median
items/s over rounds (the inference loop only: model loading is excluded everywhere).
Target: torchship batch at its best settings >= 0.9x the ceiling for ResNet-18, judged
on extra rounds that run just those two back to back (median of the paired ratios).

    python benchmarks/batch.py            # about 9 min on 2 cores
    python benchmarks/batch.py --quick    # about 3 min
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import console, cpu_count, machine_summary, print_table, ratio, synthetic_photo

from torchship import batch
from torchship.postprocess import top_k
from torchship.preprocessing import preprocess_image
from torchship.runtime import load_predictor
from torchship.store import ModelStore
from torchship.zoo import digits
from torchship.zoo.resnet import ResNet18, resnet_input_spec

TARGET = 0.9


@dataclass
class Case:
    name: str
    folder: Path
    files: list[Path]
    batch_sizes: list[int]
    naive_items: int
    rounds: int
    layouts: list[tuple[int | str, int | None]]  # (loader workers or "auto", model threads)
    target: bool = False
    verify_rounds: int = 4
    samples: dict[str, list[float]] = field(default_factory=dict)
    chosen: dict[str, set[str]] = field(default_factory=dict)  # what "auto" picked
    contenders: dict[str, Callable[[], float]] = field(default_factory=dict)
    paired: list[float] = field(default_factory=list)  # torchship / ceiling, per round


def make_resnet(store: ModelStore, root: Path, n: int) -> list[Path]:
    torch.manual_seed(0)
    examples = torch.randn(
        4, *resnet_input_spec().shape, generator=torch.Generator().manual_seed(0)
    )
    store.save(ResNet18().eval(), "resnet18", input_spec=resnet_input_spec(), examples=examples)
    folder = root / "photos"
    folder.mkdir()
    files = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        synthetic_photo(i, (500, 375)).save(path, "JPEG", quality=90)
        files.append(path)
    return files


def make_digits(store: ModelStore, root: Path, n: int) -> list[Path]:
    data = digits.load_digits_split()
    torch.manual_seed(0)
    store.save(
        digits.build("cnn").eval(),
        "digits-cnn",
        input_spec=digits.input_spec(),
        labels=digits.LABELS,
        examples=data.x_test[:64],
    )
    folder = root / "drawings"
    folder.mkdir()
    files = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        digits.render_digit(data.raw_test[i % len(data.raw_test)], size=64).save(path)
        files.append(path)
    return files


def naive(store: ModelStore, model: str, files: list[Path], out: Path) -> float:
    """items/s of the per-item loop (model loading excluded, as everywhere here)."""
    predictor = load_predictor(store, model, runtime="eager", device="cpu", threads=cpu_count())
    spec = predictor.input_spec
    assert spec is not None
    start = time.perf_counter()
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        for path in files:
            x = preprocess_image(path.read_bytes(), spec)
            best = top_k(predictor.predict(x[None]), predictor.labels, 3)[0]
            writer.writerow([path.name, *(b["label"] for b in best)])
    return len(files) / (time.perf_counter() - start)


_TENSORS: dict[str, torch.Tensor] = {}


def ceiling(store: ModelStore, model: str, files: list[Path], size: int, threads: int) -> float:
    """items/s of ``predict`` alone on pre-made tensors, batch ``size``, ``threads``."""
    predictor = load_predictor(store, model, runtime="eager", device="cpu", threads=threads)
    spec = predictor.input_spec
    assert spec is not None
    if model not in _TENSORS:
        _TENSORS[model] = torch.stack([preprocess_image(p.read_bytes(), spec) for p in files])
    tensors = _TENSORS[model]
    predictor.predict(tensors[:size])
    start = time.perf_counter()
    for i in range(0, len(tensors), size):
        top_k(predictor.predict(tensors[i : i + size]), predictor.labels, 3)
    return len(tensors) / (time.perf_counter() - start)


def torchship_batch(
    store: ModelStore,
    model: str,
    folder: Path,
    out: Path,
    size: int,
    workers: int | str,
    threads: int | None,
    chosen: dict[str, set[str]],
    key: str,
) -> float:
    summary = batch.run(
        model,
        folder,
        out,
        store=store,
        batch_size=size,
        num_workers=workers,  # type: ignore[arg-type]
        threads=threads,
        runtime="eager",
        device="cpu",
        overwrite=True,
        progress=False,
    )
    assert summary.complete and summary.failures == 0, summary
    chosen.setdefault(key, set()).add(f"w={summary.num_workers} t={summary.threads}")
    return summary.items_per_s


def bench(case: Case, store: ModelStore, tmp: Path) -> None:
    cores = cpu_count()
    contenders: dict[str, Callable[[], float]] = {}
    contenders["naive per-item loop"] = lambda: naive(
        store, case.name, case.files[: case.naive_items], tmp / "naive.csv"
    )
    for size in case.batch_sizes:
        for t in sorted({1, cores}):
            contenders[f"ceiling b={size} t={t}"] = lambda size=size, t=t: ceiling(  # type: ignore[misc]
                store, case.name, case.files, size, t
            )
    for size in case.batch_sizes:
        for w, threads in case.layouts:
            if w == "auto":
                key = f"torchship b={size} auto"
            else:
                key = f"torchship b={size} w={w} t={threads or max(1, cores - int(w))}"
            contenders[key] = lambda size=size, w=w, threads=threads, key=key: torchship_batch(  # type: ignore[misc]
                store, case.name, case.folder, tmp / "out.csv", size, w, threads, case.chosen, key
            )
    case.contenders = contenders
    names = list(contenders)
    case.samples = {name: [] for name in names}
    for r in range(case.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            case.samples[name].append(contenders[name]())
        console.print(f"  {case.name}: round {r + 1}/{case.rounds} done")


def report(case: Case) -> tuple[list[list[str]], list[str] | None]:
    med = {name: statistics.median(v) for name, v in case.samples.items()}
    naive_rate = med["naive per-item loop"]
    ceilings = {n: v for n, v in med.items() if n.startswith("ceiling")}
    ours = {n: v for n, v in med.items() if n.startswith("torchship")}
    best_ceiling = max(ceilings, key=ceilings.__getitem__)
    best_ours = max(ours, key=ours.__getitem__)
    rows = []
    for name, value in med.items():
        spread = f"{min(case.samples[name]):,.1f}-{max(case.samples[name]):,.1f}"
        mark = " *" if name in (best_ceiling, best_ours) else ""
        picked = f" ({', '.join(sorted(case.chosen[name]))})" if name.endswith("auto") else ""
        rows.append(
            [
                case.name,
                name + picked + mark,
                f"{value:,.1f}",
                spread,
                ratio(value, naive_rate),
                ratio(value, ceilings[best_ceiling]),
            ]
        )
    verdict = None
    if case.target:
        # The verdict: the two best contenders again, back to back in each round
        # (alternating which goes first), so load that comes and goes hits both alike;
        # the median of the per-round ratios is what counts.
        for r in range(case.verify_rounds):
            pair = [best_ceiling, best_ours] if r % 2 else [best_ours, best_ceiling]
            rates = {name: case.contenders[name]() for name in pair}
            case.paired.append(rates[best_ours] / rates[best_ceiling])
        share = statistics.median(case.paired)
        verdict = [
            case.name,
            f"best torchship batch >= {TARGET}x ceiling",
            f"{best_ours} vs {best_ceiling}, {len(case.paired)} paired rounds: "
            + ", ".join(f"{p:.2f}" for p in case.paired),
            f"{share:.2f}x",
            "PASS" if share >= TARGET else "MISS",
        ]
    return rows, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds; ~3 min")
    parser.add_argument("--models", default="resnet18,digits", help="comma list")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    cores = cpu_count()
    quick = args.quick
    # (loader workers, model threads): None = the cores the workers leave; the model on
    # every core next to a worker (oversubscribed) shows why that is the default.
    layouts: list[tuple[int | str, int | None]] = [(0, None), ("auto", None)]
    for w in range(1, cores + 1):
        layouts.append((w, None))
        if max(1, cores - w) != cores:
            layouts.append((w, cores))
    heavy_quick = [(0, None), ("auto", None), (1, None), (1, cores)]  # ResNet: cores matter
    light_quick = [(0, None), ("auto", None), (1, None), (cores, None)]  # digits: workers do
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    console.print(f"[bold]torchship batch benchmark[/] on {machine_summary()}")
    rows: list[list[str]] = []
    verdicts: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="torchship-bench-batch-") as root:
        tmp = Path(root)
        store = ModelStore(tmp / "models")
        cases = []
        if "resnet18" in wanted:
            n = 32 if quick else 128
            console.print(f"writing {n} 500x375 JPEGs for ResNet-18 ...")
            files = make_resnet(store, tmp, n)
            cases.append(
                Case(
                    "resnet18",
                    files[0].parent,
                    files,
                    batch_sizes=[8, 32] if quick else [1, 8, 32],
                    naive_items=12 if quick else 32,
                    rounds=2 if quick else 3,
                    layouts=heavy_quick if quick else layouts,
                    target=True,
                    verify_rounds=4 if quick else 8,
                )
            )
        if "digits" in wanted:
            n = 1000 if quick else 3000
            console.print(f"writing {n} 64x64 PNG digit drawings ...")
            files = make_digits(store, tmp, n)
            cases.append(
                Case(
                    "digits-cnn",
                    files[0].parent,
                    files,
                    batch_sizes=[64, 256] if quick else [16, 64, 256],
                    naive_items=200 if quick else 600,
                    rounds=2 if quick else 3,
                    layouts=light_quick if quick else layouts,
                )
            )
        for case in cases:
            console.print(
                f"measuring {case.name} ({len(case.files)} files, {case.rounds} rounds) ..."
            )
            bench(case, store, tmp)
            case_rows, verdict = report(case)  # measures the target's paired rounds too
            for row in case_rows:
                console.print("  " + "  ".join(row), highlight=False)
            rows += case_rows
            if verdict:
                verdicts.append(verdict)
    print_table(
        "Batch inference throughput (items/s, median over rounds)",
        ["model", "contender", "items/s", "range", "vs naive", "vs ceiling"],
        rows,
        caption="b = batch size, w = DataLoader workers, t = model threads; * = best of its "
        "kind. Eager runtime, CPU, random weights; model loading excluded.",
    )
    print_table("Target", ["model", "target", "measured", "ratio", "verdict"], verdicts)
    console.print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

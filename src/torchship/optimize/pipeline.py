"""``optimize()``: make each variant, store it, load it back, measure all, pick, report."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from torchship.devices import resolve_device
from torchship.errors import ConfigError, TorchshipError
from torchship.optimize.cuda import CudaOptimized
from torchship.optimize.data import OptimizeData, resolve_data
from torchship.optimize.errors import MethodSkipped, OptimizeError
from torchship.optimize.measure import Measurement, measure_variants
from torchship.optimize.methods import Candidate, Context, Method, resolve_methods
from torchship.optimize.options import OptimizeOptions
from torchship.optimize.pick import pick_within_budget
from torchship.optimize.precision import cpu_half_support
from torchship.optimize.report import OptimizeReport, VariantRow
from torchship.runtime import Predictor, load_predictor, set_threads
from torchship.store import Manifest, ModelStore, validate_name
from torchship.store.serialization import ArchitectureWarning

logger = logging.getLogger(__name__)

PARENT = "fp32 eager (parent)"
ROUND_TRIP_TOLERANCE = 1e-5
Progress = Callable[[str], None]


def optimize(
    store: ModelStore | str | Path,
    ref: str,
    methods: Iterable[str] | str,
    *,
    options: OptimizeOptions | None = None,
    accuracy_budget: float | None = None,
    tag: str = "optimized",
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> OptimizeReport:
    """Make a new store version of ``ref`` per method, measure them all, report.

    Every variant is saved with ``parent=`` the source version and loaded back through
    the ordinary loader (and checked to compute what was saved) before it is measured,
    so the numbers are those of what would be served. Methods that do not apply are
    reported as skipped, methods that fail as failed; neither stops the others.

    With ``accuracy_budget`` (points) the fastest variant within it is tagged ``tag``
    (see :mod:`torchship.optimize.pick`); ``report.picked`` is None when nothing
    qualifies. Sets torch's thread count for the process (``options.threads``).
    """
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    options = options or OptimizeOptions()
    chosen = resolve_methods(methods)
    _check_budget(accuracy_budget, tag)
    say = progress or (lambda _msg: None)

    manifest = store.verify(ref)
    if manifest.architecture is None:
        raise OptimizeError(
            f"{manifest.ref} records no architecture, so no variant could be rebuilt from it."
        )
    device = resolve_device(options.device)
    set_threads(options.threads or _cores())
    parent = store.load(manifest.ref, device="cpu", trust_pickle=options.trust_pickle, verify=False)
    data = resolve_data(store, manifest, options.data)
    ctx = Context(store, manifest, parent, manifest.architecture, data, options, device)

    rows = [_make(ctx, method, say) for method in chosen]

    return _evaluate(store, manifest, rows, data, options, accuracy_budget, tag, out_dir, say)


def remeasure(
    store: ModelStore | str | Path,
    report: OptimizeReport,
    *,
    options: OptimizeOptions | None = None,
    accuracy_budget: float | None = None,
    tag: str = "optimized",
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> OptimizeReport:
    """Measure the versions of an earlier :func:`optimize` report again, e.g. with other
    ``options.threads`` or ``options.device``, without making them again."""
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    options = options or OptimizeOptions()
    _check_budget(accuracy_budget, tag)
    manifest = store.verify(report.parent)
    rows = [
        VariantRow(
            r.method,
            r.family,
            r.status,
            ref=r.ref,
            reason=r.reason,
            seconds_to_make=r.seconds_to_make,
            notes=list(r.notes),
        )
        for r in report.rows
        if r.status != "parent"
    ]
    data = resolve_data(store, manifest, options.data)
    return _evaluate(store, manifest, rows, data, options, accuracy_budget, tag, out_dir, progress)


def _check_budget(accuracy_budget: float | None, tag: str) -> None:
    if accuracy_budget is not None and not (
        math.isfinite(accuracy_budget) and accuracy_budget >= 0
    ):
        raise ConfigError(f"The accuracy budget must be >= 0 points, got {accuracy_budget}.")
    validate_name(tag, "alias")


def _evaluate(
    store: ModelStore,
    manifest: Manifest,
    rows: list[VariantRow],
    data: OptimizeData,
    options: OptimizeOptions,
    accuracy_budget: float | None,
    tag: str,
    out_dir: str | Path | None,
    progress: Progress | None,
) -> OptimizeReport:
    """Load the parent and every made variant, measure them together, report, pick."""
    say = progress or (lambda _msg: None)
    device = resolve_device(options.device)
    threads = options.threads or _cores()
    set_threads(threads)
    made = [(r, store.manifest(r.ref)) for r in rows if r.status == "ok" and r.ref]
    say(f"measuring {len(made) + 1} variants on {device}, {_threads(threads)} ...")
    parent_row = VariantRow(PARENT, "parent", "parent", ref=manifest.ref)
    parent_row.size_bytes = _weights_size(manifest)
    measured = _measure(store, manifest, made, data, device, threads, options)
    _fill(parent_row, measured[PARENT], measured[PARENT], data.labelled)
    for row, saved in made:
        _fill(row, measured[row.method], measured[PARENT], data.labelled)
        row.size_bytes = _weights_size(saved)
        _record_metrics(store, saved, {**_metrics(row), "measured_threads": float(threads)})

    report = OptimizeReport(
        model=manifest.name,
        parent=manifest.ref,
        machine=_machine(),
        device=str(device),
        threads=threads,
        data=data.name,
        labelled=data.labelled,
        rows=[parent_row, *rows],
        measure_seconds=options.measure_seconds,
        budget_points=accuracy_budget,
        tag=tag,
        notes=_global_notes(rows, device),
    )
    if accuracy_budget is not None:
        picked, report.pick_reason = pick_within_budget(report.rows, accuracy_budget)
        if picked is not None and picked.ref is not None:
            store.set_alias(manifest.name, tag, picked.ref.partition(":")[2])
            report.picked = picked.ref
    if out_dir is not None:
        report.write(out_dir)
    return report


def _make(ctx: Context, method: Method, say: Progress) -> VariantRow:
    row = VariantRow(method.name, method.family, "ok")
    start = time.monotonic()
    try:
        candidate = method.make(ctx)
        saved = _save(ctx, method, candidate)
    except MethodSkipped as skip:
        row.status, row.reason = "skipped", skip.reason
        say(f"{method.name}: skipped ({skip.reason})")
        return row
    except TorchshipError as exc:
        row.status, row.reason = "failed", str(exc)
        say(f"{method.name}: failed ({exc.message})")
        return row
    except Exception as exc:  # a method on an unusual model can fail in any way
        logger.info("%s failed", method.name, exc_info=True)
        row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"
        say(f"{method.name}: failed ({row.reason}; -v for the traceback)")
        return row
    row.ref = saved.ref
    row.notes = candidate.notes
    row.seconds_to_make = time.monotonic() - start
    say(f"{method.name}: saved {saved.ref} ({row.seconds_to_make:.1f} s)")
    return row


def _save(ctx: Context, method: Method, candidate: Candidate) -> Manifest:
    """Store the candidate, then prove it loads back and computes the same outputs."""
    parent = ctx.manifest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ArchitectureWarning)
        saved = ctx.store.save(
            candidate.module,
            parent.name,
            architecture=candidate.architecture,
            input_spec=parent.input,
            labels=parent.labels,
            examples=ctx.store.load_examples(parent.ref),
            parent=parent.ref,
            tags=["optimized", method.name],
            description=f"{method.summary} of {parent.ref}. " + "; ".join(candidate.notes),
            output_names=parent.output_names,
        )
    try:
        loaded = ctx.store.load(saved.ref, device="cpu")
        diff = _max_diff(candidate.module, loaded, ctx.example)
        if diff > ROUND_TRIP_TOLERANCE:
            raise OptimizeError(
                f"the stored version computes different outputs (max diff {diff:.3g})"
            )
    except TorchshipError as exc:
        ctx.store.delete(saved.ref, force=True)
        problems = "; ".join(str(w.message) for w in caught)
        raise OptimizeError(
            f"{method.name}: the saved version does not load back: {exc.message}"
            + (f" ({problems})" if problems else ""),
        ) from exc
    return saved


def _max_diff(made: nn.Module, loaded: nn.Module, x: torch.Tensor) -> float:
    if isinstance(made, CudaOptimized) and isinstance(loaded, CudaOptimized):
        made, loaded = made.model, loaded.model  # compare the weights, not compile again
    with torch.inference_mode():
        a, b = made(x), loaded(x)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return math.inf
    scale = max(1.0, float(a.abs().max()))
    return float((a.float() - b.float()).abs().max()) / scale


def _measure(
    store: ModelStore,
    manifest: Manifest,
    made: list[tuple[VariantRow, Manifest]],
    data: OptimizeData,
    device: torch.device,
    threads: int,
    options: OptimizeOptions,
) -> dict[str, Measurement]:
    predictors: dict[str, Predictor] = {}
    try:
        predictors[PARENT] = load_predictor(
            store,
            manifest.ref,
            runtime="eager",
            device=device,
            threads=threads,
            trust_pickle=options.trust_pickle,
            warmup=False,
        )
        for row, saved in made:
            predictors[row.method] = load_predictor(
                store, saved.ref, runtime="eager", device=device, threads=threads, warmup=False
            )
        return measure_variants(
            {name: p.predict for name, p in predictors.items()},
            data.x_test,
            data.y_test,
            reference=PARENT,
            budget_s=options.measure_seconds,
            min_rounds=options.min_rounds,
        )
    finally:
        for p in predictors.values():
            p.close()


def _fill(row: VariantRow, m: Measurement, parent: Measurement, labelled: bool) -> None:
    row.top1, row.agreement = m.top1, m.agreement
    if labelled and m.top1 is not None and parent.top1 is not None:
        row.drop_points = (parent.top1 - m.top1) * 100
    else:
        row.drop_points = (1 - m.agreement) * 100
    row.p50_ms, row.p99_ms, row.items_per_s = m.p50_ms, m.p99_ms, m.items_per_s
    row.speedup = m.items_per_s / parent.items_per_s if parent.items_per_s > 0 else None
    row.latency_speedup = parent.p50_ms / m.p50_ms if m.p50_ms > 0 else None


def _metrics(row: VariantRow) -> dict[str, float]:
    values = {
        "test_accuracy": row.top1,
        "agreement_with_parent": row.agreement,
        "accuracy_drop_points": row.drop_points,
        "p50_ms_b1": row.p50_ms,
        "p99_ms_b1": row.p99_ms,
        "items_per_s_b32": row.items_per_s,
        "speedup_b32": row.speedup,
    }
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def _record_metrics(store: ModelStore, saved: Manifest, metrics: dict[str, float]) -> None:
    def change(manifest: Manifest) -> None:
        manifest.metrics.update(metrics)

    store.update_manifest(saved.ref, change)


def _weights_size(manifest: Manifest) -> int:
    return manifest.files[manifest.weights.file].size


def _global_notes(rows: list[VariantRow], device: torch.device) -> list[str]:
    notes = []
    methods = {r.method for r in rows if r.status == "ok"}
    if device.type == "cpu":
        if "bf16" in methods:
            notes.append(f"bf16: {cpu_half_support('bfloat16')}.")
        if "fp16" in methods:
            notes.append(f"fp16: {cpu_half_support('float16')}.")
    if methods & {"dynamic-int8", "static-int8"}:
        notes.append(
            "dynamic-int8/static-int8 use torch.ao.quantization (FBGEMM/oneDNN kernels), "
            "deprecated upstream in favour of torchao but shipped and working in torch "
            f"{torch.__version__.split('+')[0]}; int8 runs on the CPU."
        )
    if "prune-unstructured" in methods:
        notes.append(
            "Unstructured pruning leaves zeros in dense tensors: same file size and, with "
            "dense kernels, the same speed; structured pruning is what shrinks both."
        )
    return notes


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {_cores()} cores{gpu}; python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )

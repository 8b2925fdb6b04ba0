"""Offline batch inference: a folder or file of inputs in, one row of predictions per input out.

>>> from torchship import batch
>>> summary = batch.run("digits", "images/", "predictions.csv")  # doctest: +SKIP
>>> print(summary)  # doctest: +SKIP
1,000 items (2 failed) in 1.9 s: 526 items/s (+0.4 s startup) -> predictions.csv

The pieces, each replaceable on its own: :mod:`~torchship.batch.sources` lists and reads
inputs, :mod:`~torchship.batch.dataset` preprocesses and predicts (the steps every
engine shares), :mod:`~torchship.batch.writers` commits rows in resumable chunks,
:mod:`~torchship.batch.engine_local` (DataLoader) and :mod:`~torchship.batch.engine_ray`
(Ray Data) drive them, :mod:`~torchship.batch.progress` shows how far along it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torchship.batch.engine_local import EngineRun
from torchship.batch.progress import Progress
from torchship.batch.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMMIT_INTERVAL_S,
    BatchSettings,
)
from torchship.batch.sources import Source, open_source
from torchship.batch.writers import ChunkedOutput, Committer, Row, count_rows, read_rows
from torchship.errors import ConfigError
from torchship.preprocessing import DEFAULT_MAX_PIXELS
from torchship.runtime import RuntimeChoice
from torchship.store import InputSpec, ModelStore

if TYPE_CHECKING:
    from torchship.monitoring.tensorboard import TensorBoardLogger

__all__ = ["BatchSettings", "BatchSummary", "Row", "Source", "open_source", "read_rows", "run"]

logger = logging.getLogger(__name__)

Engine = Literal["local", "ray"]


@dataclass(frozen=True)
class BatchSummary:
    """What one :func:`run` did. ``seconds`` is the inference loop alone (input listing,
    model loading and warm-up are ``startup_seconds``), so ``items_per_s`` is the rate."""

    output: Path
    total: int  # inputs found
    items: int  # processed by this run
    failures: int  # failure rows among them
    skipped: int  # committed by an earlier run and resumed past
    seconds: float
    startup_seconds: float
    complete: bool  # False when stopped early: resume to finish
    engine: str
    runtime: str
    device: str
    batch_size: int
    num_workers: int
    threads: int
    plan: str = ""  # num_workers="auto": what was measured and chosen

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        failed = f" ({self.failures:,} failed)" if self.failures else ""
        resumed = f", {self.skipped:,} resumed past" if self.skipped else ""
        where = (
            f"-> {self.output}"
            if self.complete
            else f"-> stopped at {self.skipped + self.items:,} of {self.total:,}; resume to finish"
        )
        return (
            f"{self.items:,} items{failed} in {self.seconds:.1f} s: "
            f"{self.items_per_s:,.0f} items/s (+{self.startup_seconds:.1f} s startup"
            f"{resumed}) {where}"
        )


def run(
    model: str,
    inputs: str | Path,
    output: str | Path,
    *,
    store: ModelStore | str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int | Literal["auto"] = "auto",
    threads: int | None = None,
    device: str = "auto",
    runtime: RuntimeChoice = "auto",
    top_k: int = 3,
    resume: bool = False,
    overwrite: bool = False,
    engine: Engine = "local",
    ray_address: str | None = None,
    amp: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S,
    stop_after: int | None = None,
    progress: bool | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    trust_pickle: bool = False,
    tensorboard: str | Path | None = None,
) -> BatchSummary:
    """Predict every item of ``inputs`` with ``model`` and write one row each to ``output``.

    ``inputs``: a folder of images (recursive), or a ``.csv``/``.jsonl``/``.parquet``
    listing paths or tensors, or an ``.npy``/``.npz`` array (see
    :mod:`torchship.batch.sources`). ``output``: ``.csv``, ``.jsonl`` or ``.parquet``,
    in input order; unreadable items get a row with ``status="error"`` and the reason.

    ``resume=True`` continues an interrupted run of the same job from its last committed
    chunk; ``overwrite=True`` replaces an existing output. ``stop_after=n`` processes at
    most ``n`` items and leaves the job resumable, as an interruption would.

    ``num_workers``: DataLoader processes; ``"auto"`` times preprocessing and the model
    on a few items and picks the count (see :mod:`torchship.batch.plan`; the choice is
    in ``summary.plan``). With ``engine="ray"`` it is the actor count (``"auto"``: one
    per ``threads`` CPUs of the cluster). ``threads``: the model's intra-op threads
    (default: the cores the workers leave). ``amp``: float16 autocast on CUDA.
    ``progress``: ``None`` shows a bar only on a terminal. ``tensorboard``: a folder
    to write the job's throughput over time, its summary and settings to, as a
    TensorBoard run (needs ``torchship[monitoring]``).
    """
    begin = time.monotonic()
    _check(batch_size, top_k, chunk_size, num_workers, engine, stop_after)
    if not isinstance(store, ModelStore):
        from torchship.settings import load_settings

        store = ModelStore(load_settings(store=store).store)
    manifest = store.manifest(model)  # pins the version: an alias may move meanwhile
    spec = manifest.input
    if spec is None:
        raise ConfigError(
            f"{manifest.ref} has no input spec, so batch inputs cannot be prepared for it.",
            hint="Save the model with input_spec=InputSpec(...).",
        )
    source = open_source(inputs, spec)
    out = ChunkedOutput(
        output,
        {"inputs": source.fingerprint(), "model": manifest.ref, "top_k": top_k},
        top_k=top_k,
        resume=resume,
        overwrite=overwrite,
    )
    total = len(source)
    if out.already_complete and (rows := count_rows(out.path)) != total:
        raise ConfigError(
            f"{out.path} is complete with {rows:,} rows, but the inputs now hold {total:,}.",
            hint="Pass --overwrite (overwrite=True) to predict them all again.",
        )
    first = out.committed
    last = total if stop_after is None else min(total, first + stop_after)
    indices = range(first, last)
    logger.info("%s: %d to do, %d already committed", source.describe(), len(indices), first)
    if getattr(source, "ignored", 0):  # a folder's other files: said, so none vanish unseen
        logger.warning("%s", source.describe())

    from torchship.batch.engine_local import available_cores

    job = _Job(
        store=store,
        ref=manifest.ref,
        spec=spec,
        runtime=runtime,
        device=device,
        batch_size=batch_size,
        top_k=top_k,
        amp=amp,
        max_pixels=max_image_pixels,
        num_workers=num_workers,
        threads=threads,
        trust_pickle=trust_pickle,
        ray_address=ray_address,
        cores=available_cores(),
    )
    result = EngineRun()
    tb = _tensorboard(tensorboard, manifest.ref)
    job.startup = time.monotonic() - begin
    if indices and not out.already_complete:
        on_advance = tb.throughput("batch", first) if tb is not None else None
        with Progress(total, first, enabled=progress, on_advance=on_advance) as bar:
            committer = Committer(out, chunk_size, commit_interval_s)
            run_engine = _run_ray if engine == "ray" else _run_local
            try:
                result = run_engine(job, source, indices, committer, bar)
            except BaseException:
                if tb is not None:  # keep the curve of an interrupted job
                    tb.close()
                raise
            if engine == "ray":  # actors load the model while the job runs
                job.startup = time.monotonic() - begin - result.seconds
            else:
                job.startup += result.startup
    complete = out.already_complete or out.committed == total
    if complete:
        out.finish()
    summary = BatchSummary(
        output=Path(output),
        total=total,
        items=result.items,
        failures=result.failures,
        skipped=total if out.already_complete else first,
        seconds=result.seconds,
        startup_seconds=job.startup,
        complete=complete,
        engine=engine,
        runtime=job.runtime,
        device=job.device,
        batch_size=batch_size,
        num_workers=job.workers,
        threads=job.threads or 0,
        plan=job.plan,
    )
    if tb is not None:
        _log_summary(tb, summary)
    return summary


def _tensorboard(logdir: str | Path | None, ref: str) -> TensorBoardLogger | None:
    if logdir is None:
        return None
    from torchship.monitoring.tensorboard import TensorBoardLogger

    run = f"batch-{ref.replace(':', '-v')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return TensorBoardLogger(logdir, run)


def _log_summary(tb: TensorBoardLogger, s: BatchSummary) -> None:
    """The job's totals (scalars), settings (text) and both together (HParams)."""
    with tb:
        totals = {
            "items": s.items,
            "failures": s.failures,
            "items_per_s": s.items_per_s,
            "seconds": s.seconds,
            "startup_seconds": s.startup_seconds,
        }
        tb.scalars(totals, step=s.skipped + s.items, prefix="batch/summary")
        settings = {
            "output": str(s.output),
            "engine": s.engine,
            "runtime": s.runtime,
            "device": s.device,
            "batch_size": s.batch_size,
            "num_workers": s.num_workers,
            "threads": s.threads,
        }
        tb.table("batch/settings", ["setting", "value"], [*settings.items(), ("plan", s.plan)])
        tb.hparams(
            {k: v for k, v in settings.items() if k != "output"},
            {"hparam/items_per_s": s.items_per_s, "hparam/failures": s.failures},
        )


@dataclass
class _Job:
    """What the engines are asked to do; they fill in what they chose (runtime, workers...)."""

    store: ModelStore
    ref: str  # name:version, pinned
    spec: InputSpec
    runtime: str
    device: str
    batch_size: int
    top_k: int
    amp: bool
    max_pixels: int
    num_workers: int | Literal["auto"]
    threads: int | None
    trust_pickle: bool
    ray_address: str | None
    cores: int
    workers: int = 0
    plan: str = ""
    startup: float = 0.0


def _run_local(
    job: _Job, source: Source, indices: range, committer: Committer, bar: Progress
) -> EngineRun:
    import torch

    from torchship.batch.dataset import InferenceDataset
    from torchship.batch.engine_local import plan_threads, run_local
    from torchship.batch.plan import plan_auto
    from torchship.runtime import load_predictor, set_threads

    start = time.monotonic()
    caller_threads = torch.get_num_threads()  # restored at the end: it is process-wide
    dataset = InferenceDataset(source, job.spec, indices, max_pixels=job.max_pixels)
    auto = job.num_workers == "auto"
    job.workers = 0 if job.num_workers == "auto" else job.num_workers
    explicit_threads = job.threads is not None
    if job.threads is None:
        job.threads = job.cores if auto else plan_threads(job.workers, job.cores)
    predictor = load_predictor(
        job.store,
        job.ref,
        runtime=job.runtime,  # type: ignore[arg-type]
        device=job.device,
        threads=job.threads,
        trust_pickle=job.trust_pickle,
    )
    try:
        if auto and predictor.device.type == "cpu":
            plan = plan_auto(dataset, predictor, job.cores)
            job.workers, job.plan = plan.workers, str(plan)
            if not explicit_threads and plan.threads != job.threads:
                job.threads = plan.threads
                if predictor.runtime == "onnxruntime":  # a session's threads are fixed
                    predictor.close()
                    predictor = load_predictor(
                        job.store, job.ref, runtime="onnx", device=job.device, threads=job.threads
                    )
                else:
                    set_threads(job.threads)
        elif auto:  # CUDA: the GPU computes, workers keep it fed
            job.workers = max(1, min(4, job.cores - 1))
        job.runtime, job.device = predictor.runtime, str(predictor.device)
        loaded = time.monotonic() - start
        result = run_local(
            dataset,
            predictor,
            committer,
            batch_size=job.batch_size,
            num_workers=job.workers,
            top_k=job.top_k,
            progress=bar,
            amp=job.amp,
        )
        result.startup = loaded
        return result
    finally:
        predictor.close()
        torch.set_num_threads(caller_threads)


def _run_ray(
    job: _Job, source: Source, indices: range, committer: Committer, bar: Progress
) -> EngineRun:
    from torchship.batch.engine_ray import run_ray

    actors = None if job.num_workers == "auto" else job.num_workers
    job.threads = job.threads or 1
    job.workers = actors or 0
    return run_ray(
        source,
        job.spec,
        committer,
        indices,
        store=job.store.root.resolve(),
        ref=job.ref,
        runtime=job.runtime,
        device=job.device,
        batch_size=job.batch_size,
        actors=actors,
        threads=job.threads,
        top_k=job.top_k,
        amp=job.amp,
        max_pixels=job.max_pixels,
        progress=bar,
        ray_address=job.ray_address,
        num_cpus=job.cores,
    )


def _check(
    batch_size: int,
    top_k: int,
    chunk_size: int,
    num_workers: int | str,
    engine: str,
    stop_after: int | None,
) -> None:
    for name, value in (("batch_size", batch_size), ("top_k", top_k), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
        raise ConfigError(f"num_workers must be 'auto' or an integer >= 0, got {num_workers!r}.")
    if engine not in ("local", "ray"):
        raise ConfigError(f"Unknown engine {engine!r}.", hint="Use 'local' or 'ray'.")
    if stop_after is not None and stop_after < 0:
        raise ConfigError(f"stop_after must be >= 0, got {stop_after}.")

"""The Ray engine: the same read/preprocess/predict steps on Ray Data, for many machines.

The item indices to process become a Ray dataset; ``map_batches`` sends batches of
them to a pool of actors (``ActorPoolStrategy``), each of which loads the model once
and runs :class:`~torchship.batch.dataset.InferenceDataset` and
:func:`~torchship.batch.dataset.predict_rows`, exactly what the local engine runs.
Results stream back to this process in input order (``preserve_order``) and are
committed through the same :class:`~torchship.batch.writers.ChunkedOutput`, so
``--resume`` works the same way.

Every actor must be able to read the model store and the inputs at the paths given:
on a cluster that means a shared filesystem (and torchship installed on every node).

``ray`` is imported only here, only when ``engine="ray"`` is chosen.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from torchship.batch.dataset import InferenceDataset, collate, predict_rows
from torchship.batch.engine_local import EngineRun
from torchship.batch.progress import Progress
from torchship.batch.sources import Source
from torchship.batch.writers import Committer, Row
from torchship.errors import MissingDependencyError
from torchship.store.manifest import InputSpec

logger = logging.getLogger(__name__)

BLOCKS_PER_ACTOR = 4
"""Input blocks per actor: enough to keep every actor busy, few enough to stay cheap."""


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingDependencyError("ray", "ray", "The Ray engine (--engine ray)") from exc
    return ray


class BatchActor:
    """One Ray actor: loads the model once, then turns batches of indices into rows."""

    def __init__(
        self,
        *,
        store: str,
        ref: str,
        runtime: str,
        device: str,
        threads: int,
        source: Source,
        spec: InputSpec,
        top_k: int,
        amp: bool,
        max_pixels: int,
    ) -> None:
        from torchship.runtime import load_predictor

        self.predictor = load_predictor(
            store,
            ref,
            runtime=runtime,  # type: ignore[arg-type]
            device=device,
            threads=threads,
        )
        self.dataset = InferenceDataset(source, spec, max_pixels=max_pixels)
        self.top_k = top_k
        self.amp = amp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = [self.dataset[int(i)] for i in batch["data"]]
        rows = predict_rows(self.predictor, collate(samples), top_k=self.top_k, amp=self.amp)
        return {
            "index": np.asarray([r.index for r in rows], dtype=np.int64),
            "id": np.asarray([r.id for r in rows], dtype=object),
            "status": np.asarray([r.status for r in rows], dtype=object),
            "error": np.asarray([r.error or "" for r in rows], dtype=object),
            "top": np.asarray(
                [json.dumps([r.labels, r.probabilities]) for r in rows], dtype=object
            ),
        }


def _rows(batch: dict[str, np.ndarray]) -> list[Row]:
    rows = []
    for index, item_id, status, error, top in zip(
        batch["index"], batch["id"], batch["status"], batch["error"], batch["top"], strict=True
    ):
        labels, probs = json.loads(str(top))
        rows.append(
            Row(int(index), str(item_id), status, str(error) or None, tuple(labels), tuple(probs))
        )
    return rows


def run_ray(
    source: Source,
    spec: InputSpec,
    committer: Committer,
    indices: range,
    *,
    store: Path,
    ref: str,
    runtime: str,
    device: str,
    batch_size: int,
    actors: int | None,
    threads: int,
    top_k: int,
    amp: bool,
    max_pixels: int,
    progress: Progress,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> EngineRun:
    """Run ``indices`` of ``source`` on a Ray actor pool; commit rows in input order.

    Connects to ``ray_address`` when given (``"auto"`` finds a running cluster), else
    starts a local Ray for this job (``num_cpus`` CPUs, no dashboard, loopback only)
    and shuts it down at the end. ``actors=None`` runs one actor per ``threads`` CPUs
    of the cluster.
    """
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                configure_logging=False,
            )
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # ours shows the job's progress
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset INFO lines
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "disabled"
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        gpus = 1 if device != "cpu" and resources.get("GPU", 0) > 0 else 0
        pool = actors or max(1, cpus // threads)
        block = max(batch_size, -(-len(indices) // (pool * BLOCKS_PER_ACTOR)))
        blocks = [
            np.arange(start, min(start + block, indices.stop), dtype=np.int64)
            for start in range(indices.start, indices.stop, block)
        ]
        result = EngineRun()
        begin = time.monotonic()
        if not blocks:
            return result
        # One fused stage (input blocks -> actors): a separate task stage would wait for
        # CPUs that the actor pool holds.
        dataset = ray.data.from_numpy(blocks)  # one column, "data": the item indices
        predicted = dataset.map_batches(
            BatchActor,
            fn_constructor_kwargs=dict(
                store=str(store),
                ref=ref,
                runtime=runtime,
                device="cuda" if gpus else device,
                threads=threads,
                source=source,
                spec=spec,
                top_k=top_k,
                amp=amp,
                max_pixels=max_pixels,
            ),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=threads,
            num_gpus=gpus,
        )
        try:
            for out in predicted.iter_batches(batch_size=None, batch_format="numpy"):
                rows = _rows(out)
                committer.add(rows)
                result.items += len(rows)
                result.failures += sum(r.status != "ok" for r in rows)
                progress.advance(len(rows))
        finally:
            committer.flush()
            result.seconds = time.monotonic() - begin
        return result
    finally:
        if started_here:
            ray.shutdown()
